# reelserve for GPU hosts: `docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro reelserve`
# The base ships a CUDA build of PyTorch; pip keeps it because pyproject only asks for torch>=2.5.
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY serve ./serve
COPY models ./models
RUN pip install . \
 && useradd --create-home --uid 10001 reelserve \
 && mkdir -p /models \
 && chown reelserve /models

USER reelserve
VOLUME ["/models"]
EXPOSE 8000

# Loading a 14B-per-expert checkpoint takes minutes: give start-up a long grace period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

ENTRYPOINT ["reelserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models/Wan2.2-T2V-A14B-Diffusers", "--device", "cuda:0"]
