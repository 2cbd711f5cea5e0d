#!/bin/sh
# Installs reelserve the way the Docker image does (the Dockerfile runs this script), at the versions
# in constraints.txt, the file CI's own install reads too; .ci/run runs this script in a fresh venv
# with CI's CPU torch, so the image's install steps are exercised without Docker.
#
#   deploy/install.sh torch   torch alone (the image installs it in a layer of its own: it is large
#                             and changes rarely)
#   deploy/install.sh         reelserve and the rest of its dependencies
#
# TORCH_INDEX_URL: the index torch comes from (the image: PyTorch's CUDA wheels, e.g.
# https://download.pytorch.org/whl/cu128); unset, pip's own configuration decides (CI: the CPU wheel).
# Runs the `python` first on PATH: activate the venv (or set PATH) before calling it.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
constraints="$root/constraints.txt"

if [ -n "${TORCH_INDEX_URL:-}" ]; then
  python -m pip install --index-url "$TORCH_INDEX_URL" -c "$constraints" torch
else
  python -m pip install -c "$constraints" torch
fi
if [ "${1:-}" = torch ]; then
  exit 0
fi
python -m pip install -c "$constraints" "$root"
