#!/usr/bin/env bash
# One command for a GPU host: builds a bench-size random checkpoint (~330 MB) and runs every CUDA path
# of reelserve against its CPU or unoptimised path, with assertions and figures (bench/gpu_check.py).
# Budget: under 8 minutes on one GPU; the timeout below stops a hang, not a slow run.
#
#   bench/gpu_check.sh                       # cuda:0, bf16, all sections
#   bench/gpu_check.sh --only load,w8a8      # some sections; any bench/gpu_check.py flag passes through
#   bench/gpu_check.sh --cpu --size tiny     # dry run on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
exec timeout --signal=INT 480 "$python" bench/gpu_check.py --json "${GPU_CHECK_JSON:-/tmp/gpu_check.json}" "$@"
