"""A real ``redis-server`` and ``tritonserver`` on free loopback ports, shared by the serving tests."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient

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


def burst(url: str, model: str, requests: list[list[grpcclient.InferInput]], timeout: float = 60.0
          ) -> list[grpcclient.InferResult | grpcclient.InferenceServerException]:
    """Send every request at once (asynchronously, so the dynamic batcher merges them) and return each one's result
    or error, in order."""
    client = grpcclient.InferenceServerClient(url)
    results: list[grpcclient.InferResult | grpcclient.InferenceServerException | None] = [None] * len(requests)
    done = threading.Semaphore(0)

    def callback(index: int, result: grpcclient.InferResult | None,
                 error: grpcclient.InferenceServerException | None) -> None:
        results[index] = result if error is None else error
        done.release()

    for index, inputs in enumerate(requests):
        client.async_infer(model, inputs, functools.partial(callback, index))
    for _ in requests:
        assert done.acquire(timeout=timeout), "a request was never answered"
    client.close()
    return [r for r in results if r is not None]


def batches_executed(url: str, model: str) -> tuple[int, int]:
    """(inferences, executions) of ``model`` so far, from Triton's statistics: fewer executions than inferences means
    requests shared batches."""
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def watch_versions(client: redis.Redis, keys: RedisKeys) -> tuple[list[int], threading.Thread]:
    """Start collecting every configuration version announced on ``keys.notify``, in order; returns the list and
    the listener thread (``stop()`` and ``join()`` it)."""
    versions: list[int] = []
    subscriber = client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(**{keys.notify: lambda message: versions.append(int(message["data"]))})
    return versions, subscriber.run_in_thread(sleep_time=0.05, daemon=True)
