# reelserve for GPU hosts:
#   docker build -t reelserve .
#   docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro reelserve
# torch, diffusers and transformers are the versions CI tests: deploy/install.sh installs them from
# constraints.txt, the file CI's install reads too, and CI runs the same script in a fresh venv
# (.ci/run). Only the torch build differs: CUDA wheels from PyTorch's index here (they carry the
# CUDA libraries; the host needs the NVIDIA driver and container toolkit), the CPU wheel in CI.
# Pick the index of your driver's CUDA with --build-arg TORCH_INDEX_URL=.../whl/cu126 (or cu129, ...).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app
# torch first, in a layer of its own: gigabytes that change only when constraints.txt does.
COPY constraints.txt ./
COPY deploy/install.sh ./deploy/
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" sh deploy/install.sh torch

COPY pyproject.toml README.md ./
COPY serve ./serve
COPY models ./models
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" sh deploy/install.sh \
 && useradd --create-home --uid 10001 reelserve \
 && mkdir -p /models \
 && chown 10001 /models

USER 10001
VOLUME ["/models"]
EXPOSE 8000

# Loading a 14B-per-expert checkpoint takes minutes: give start-up a long grace period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# The image's defaults (host, port, model, device) are a settings file, the lowest layer, not flags: so
# REELSERVE_* variables (docker run -e) and flags after the image name both override them, and a
# mounted file replaces them (-v ./serve.yaml:/etc/reelserve.yaml:ro -e REELSERVE_CONFIG=/etc/reelserve.yaml).
COPY deploy/serve.yaml /etc/reelserve/serve.yaml
ENV REELSERVE_CONFIG=/etc/reelserve/serve.yaml
ENTRYPOINT ["reelserve", "serve"]
