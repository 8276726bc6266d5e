# Apparate controller: Redis-only online loop (no torch). Build from the repository root:
#   docker build -f deploy/controller.Dockerfile -t apparate-controller:0.1.0 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APPARATE_REDIS_URL=redis://redis:6379/0

WORKDIR /opt/apparate
COPY deploy/requirements-controller.txt ./
RUN pip install -r requirements-controller.txt

COPY pyproject.toml README.md ./
COPY early_exit/ early_exit/
COPY triton_backend/ triton_backend/
COPY controller/ controller/
COPY model_zoo/ model_zoo/
COPY workload/ workload/
RUN pip install --no-deps . && rm -rf build ./*.egg-info

RUN useradd --system --uid 10001 --no-create-home apparate
USER 10001

# Healthy while the controller can authenticate to Redis (APPARATE_REDIS_URL, APPARATE_REDIS_USERNAME and
# APPARATE_REDIS_PASSWORD); the Kubernetes readiness probe runs the same command.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD ["python", "-c", "import os, redis; redis.Redis.from_url(os.environ['APPARATE_REDIS_URL'], username=os.environ.get('APPARATE_REDIS_USERNAME'), password=os.environ.get('APPARATE_REDIS_PASSWORD'), socket_timeout=2).ping()"]

ENTRYPOINT ["python", "-m", "controller"]
CMD ["--redis-url", "redis://redis:6379/0"]
