"""A real ``redis-server`` and ``tritonserver`` on free loopback ports, shared by the serving tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from controller.config_store import publish_config, write_config
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys
from model_zoo.datasets import load_image_set
from tests.conftest import DATASET, MODEL
from workload.metrics import metric
from workload.stack import Stack, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def test_images() -> np.ndarray:
    data = load_image_set(DATASET, "test")
    return data.images[np.random.default_rng(0).permutation(len(data))]


@pytest.fixture(scope="module")
def stack(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis + Triton serving both entries and the ensemble, no controller (tests write configurations themselves)."""
    logs = tmp_path_factory.mktemp("logs")
    models = [MODEL, f"{MODEL}_vanilla", f"{MODEL}_preprocess", f"{MODEL}_pipeline"]
    with running_stack(repository, models=models, with_controller=False, log_dir=logs) as s:
        yield s


def publish(stack: Stack, thresholds: dict[int, float]) -> ExitConfig:
    """Write a configuration one version above the stored one."""
    config = publish_config(redis.Redis.from_url(stack.redis_url), RedisKeys(MODEL), thresholds, writer="test")
    assert config is not None  # no ``based_on``: never refused
    return config


def apply_config(stack: Stack, model: str, version: int, thresholds: dict[int, float]) -> None:
    """Write ``thresholds`` as ``version`` of ``model``'s configuration and wait until the server runs it."""
    write_config(redis.Redis.from_url(stack.redis_url), RedisKeys(model), ExitConfig(model, version, thresholds))
    deadline = time.monotonic() + 5
    while metric(stack.metrics_url, "apparate_config_version", model=model) != version:
        assert time.monotonic() < deadline
        time.sleep(0.01)
