"""Faults on real processes: Redis losing all of its data under load while Triton serves and the controller tunes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from early_exit.exit_rule import NEVER_EXIT
from early_exit.keys import RedisKeys
from early_exit.manifest import load_manifest
from tests.conftest import MODEL
from tests.integration.conftest import publish
from workload.client import Answer, measure_capacity, poisson_arrivals, replay
from workload.metrics import metric
from workload.stack import running_stack

pytestmark = pytest.mark.integration


def _eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _group_reads(client: redis.Redis, stream: str) -> int:
    """Entries the controller's consumer group has read from ``stream`` (0 while the group does not exist)."""
    if not client.exists(stream):
        return 0
    return sum(int(group["entries-read"] or 0) for group in client.xinfo_groups(stream))


def test_redis_losing_its_data_under_load_fails_no_request_and_control_resumes(
    repository: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    manifest = load_manifest(repository / MODEL / "1")
    keys = RedisKeys(MODEL)
    controller_args = ["--min-fresh", "300", "--window", "2000", "--adjust-every", "0"]
    with running_stack(repository, models=[MODEL], controller_args=controller_args, log_dir=tmp_path) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        start = publish(stack, {r: NEVER_EXIT for r in range(len(manifest.ramps))})
        _eventually(lambda: metric(stack.metrics_url, "apparate_config_version", model=MODEL) == start.version, 10,
                    "the first configuration applied")
        images = test_images[:4000]
        answers: list[Answer] = []
        traffic = threading.Thread(target=replay, args=(stack.grpc_url, MODEL, {"IMAGE": images},
                                                        poisson_arrivals(len(images), 200)), kwargs={"answers": answers})
        traffic.start()
        try:
            _eventually(lambda: _group_reads(client, keys.feedback) > 0, 30, "the controller reading feedback")
            in_use = metric(stack.metrics_url, "apparate_config_version", model=MODEL)
            client.flushall()  # a Redis restart without persistence, seen by nobody as an error
            _eventually(lambda: metric(stack.metrics_url, "apparate_config_version", model=MODEL) > in_use, 30,
                        "a configuration newer than the one in use published after the loss and applied")
            _eventually(lambda: client.get(keys.manifest) is not None, 30, "the manifest registered again")
            _eventually(lambda: _group_reads(client, keys.feedback) > 0, 30, "the consumer group reading again")
        finally:
            traffic.join()
        controller_log = stack.process("controller").log.read_text(errors="replace")
    assert len(answers) == len(images) and all(a.error is None for a in answers)
    assert "NOGROUP" not in controller_log, controller_log[-3000:]  # the lost group was recreated, not retried


def test_redis_frozen_for_10s_under_load_fails_and_delays_nothing_and_control_resumes(
    repository: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    """SIGSTOP on Redis for 10 s (a stalled node: connections stay open, nothing answers) while Triton serves at a
    steady rate and the controller tunes: no request fails or waits on Redis, the configuration in use stays, and
    once Redis wakes up the controller reads feedback again."""
    keys = RedisKeys(MODEL)
    controller_args = ["--min-fresh", "200", "--window", "1000", "--adjust-every", "0"]
    with running_stack(repository, models=[MODEL], controller_args=controller_args, log_dir=tmp_path) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        # A third of what the server takes on this machine now: the freeze, not a queue, must be what is measured.
        rate = 0.3 * measure_capacity(stack.grpc_url, MODEL, {"IMAGE": test_images[:400]})
        images = test_images[: int(20 * rate)]  # about 20 s: the freeze starts once feedback is read, lasts 10 s
        arrivals = poisson_arrivals(len(images), rate)
        answers: list[Answer] = []
        traffic = threading.Thread(target=replay, args=(stack.grpc_url, MODEL, {"IMAGE": images}, arrivals),
                                   kwargs={"answers": answers})
        redis_pid = stack.process("redis").popen.pid
        traffic.start()
        try:
            # Feedback from the capacity burst may be read before this traffic starts: wait for a second of it too.
            _eventually(lambda: _group_reads(client, keys.feedback) > 0 and len(answers) > rate, 30,
                        "the controller reading feedback while traffic runs")
            version = metric(stack.metrics_url, "apparate_config_version", model=MODEL)
            os.kill(redis_pid, signal.SIGSTOP)
            frozen = time.perf_counter()
            try:
                time.sleep(10)
                assert metric(stack.metrics_url, "apparate_config_version", model=MODEL) == version
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            woke = time.perf_counter()
            reads = _group_reads(client, keys.feedback)
            _eventually(lambda: _group_reads(client, keys.feedback) > reads, 30, "feedback read again after the freeze")
        finally:
            traffic.join()
    assert len(answers) == len(images) and all(a.error is None for a in answers)
    latency = np.array([a.latency_ms for a in answers])
    sent = np.array([a.sent for a in answers])
    during, before = latency[(sent >= frozen) & (sent < woke)], latency[sent < frozen]
    assert during.size > 5 * rate and before.size > 0.5 * rate
    # Nothing on the request path talks to Redis: the freeze must not show in latency beyond the machine's noise.
    assert np.percentile(during, 99) <= 3 * np.percentile(before, 99) + 20.0, (
        f"p99 {np.percentile(during, 99):.1f} ms during the freeze vs {np.percentile(before, 99):.1f} ms before")
