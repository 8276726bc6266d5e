"""What every backend of this package reads from Triton the same way: logging, model parameters, device.

Triton hands ``initialize`` the model configuration as JSON and the instance's kind and device id as strings; the
stub process has no logging configured, so without a handler our logs would vanish.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import redis
import torch

from early_exit.keys import DEFAULT_PREFIX, RedisKeys
from early_exit.redis_connection import (
    DEFAULT_REDIS_URL,
    REDIS_PREFIX_ENV,
    REDIS_URL_ENV,
    redact,
    redis_client,
)

#: Names this Triton replica in its feedback records (Kubernetes sets it to the pod name).
REPLICA_ID_ENV = "APPARATE_REPLICA_ID"


def configure_logging(logger: logging.Logger) -> None:
    """Log ``logger`` to stderr (Triton's log) once per stub process."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a ``config.pbtxt`` as plain strings."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def share_cores(parameters: dict[str, str]) -> None:
    """Apply the ``threads`` parameter: this instance's torch threads on a CPU (0 or absent: torch's default, one per
    core). Several instances that each spawn a thread per core oversubscribe the cores as soon as they run at once;
    on a CPU, two single-threaded instances also serve small batches faster than one two-threaded instance."""
    threads = int(parameters.get("threads", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def model_device(args: dict[str, str]) -> torch.device:
    """The instance's device: its GPU for ``KIND_GPU`` (when this torch build has CUDA), else the CPU."""
    if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
        return torch.device(f"cuda:{args['model_instance_device_id']}")
    return torch.device("cpu")


def redis_target(parameters: dict[str, str]) -> tuple[str, str]:
    """Redis URL and key prefix of a model: the environment wins over the model's parameters (one deployment, one
    Redis), then the defaults of a local set-up. Keep credentials out of ``redis_url``: anyone who can read the model
    repository reads its parameters; ``early_exit.redis_connection`` takes them from the environment."""
    url = os.environ.get(REDIS_URL_ENV) or parameters.get("redis_url") or DEFAULT_REDIS_URL
    prefix = os.environ.get(REDIS_PREFIX_ENV) or parameters.get("redis_prefix") or DEFAULT_PREFIX
    return url, prefix


def model_redis(name: str, parameters: dict[str, str]) -> tuple[redis.Redis, RedisKeys, str]:
    """The Redis client, key layout and loggable (redacted) URL of model ``name``, as every backend builds them. The
    timeouts are short: only the backends' background threads (config watcher, feedback publisher) use the client,
    and a stalled Redis must not hold them."""
    url, prefix = redis_target(parameters)
    client = redis_client(url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=5)
    return client, RedisKeys(name, prefix), redact(url)


def replica_id() -> str:
    """The replica this model instance serves in, as its feedback records name it: ``APPARATE_REPLICA_ID`` when set
    (the pod name on Kubernetes, shared by the pod's model instances), else ``<host name>:<process id>``, which is
    unique per model instance because Triton runs every instance of a Python model in its own stub process."""
    return os.environ.get(REPLICA_ID_ENV) or f"{socket.gethostname()}:{os.getpid()}"
