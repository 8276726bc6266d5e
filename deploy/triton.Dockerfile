# Triton 2.51 with the `apparate` Python-based backend and the prepared model repository.
# Build from the repository root after `make prepare`:
#   docker build -f deploy/triton.Dockerfile -t apparate-triton:0.1.0 .
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The .pt2 blocks are torch.export artifacts: serve them with the torch release that exported them (requirements.txt).
# The default PyPI wheel for Linux x86_64 is the CUDA build.
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APPARATE_REDIS_URL=redis://redis:6379/0 \
    APPARATE_REDIS_PREFIX=apparate

# The Python backend stub embeds the image's Python 3.10; install into its site-packages.
# async-timeout: redis-py needs it on Python < 3.11.3; pillow (the <name>_preprocess models decode encoded images)
# is a range because recent releases may have left Python 3.10 behind.
RUN python3 -m pip install "torch==${TORCH_VERSION}" "numpy==1.26.4" "redis==8.1.0" "async-timeout==5.0.1" \
      "safetensors==0.8.0" "pillow>=11,<14"

WORKDIR /opt/apparate
COPY pyproject.toml README.md ./
COPY early_exit/ early_exit/
COPY triton_backend/ triton_backend/
COPY controller/ controller/
COPY model_zoo/ model_zoo/
COPY workload/ workload/
RUN python3 -m pip install --no-deps . && rm -rf build ./*.egg-info

# Backend entry points: Triton loads <backends>/<name>/model.py for apparate (latency mode), apparate_e3 (E3 router)
# and apparate_e3_block (E3 block models); the image's own Python backend runs them.
RUN python3 -m triton_backend.server shims --out /opt/tritonserver/backends

COPY model_repository/ /models/

# Triton needs no root: it only reads /opt/tritonserver and /models, and writes /dev/shm and /tmp.
RUN useradd --system --uid 10001 --no-create-home apparate
USER 10001

EXPOSE 8000 8001 8002
# Healthy once every loaded model is ready, as the Kubernetes readiness probe; start-period covers model loading.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=2)"]
# Explicit model control, as `make serve`: /models may also hold other prepared entries (digits_resnet* when
# `make prepare` ran on the digits fallback); to serve those, override the command's --load-model list.
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", \
     "--load-model=cifar10_resnet", "--load-model=cifar10_resnet_vanilla", \
     "--load-model=cifar10_resnet_preprocess", "--load-model=cifar10_resnet_pipeline", \
     "--http-port=8000", "--grpc-port=8001", "--allow-metrics=true", "--metrics-port=8002"]
