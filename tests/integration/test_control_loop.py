"""The whole loop: live traffic → feedback stream → controller → configuration → backend, on real processes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from controller.config_store import read_config
from early_exit.exit_rule import NEVER_EXIT
from early_exit.keys import RedisKeys
from early_exit.manifest import load_manifest
from tests.conftest import MODEL
from tests.integration.conftest import publish
from workload.client import poisson_arrivals, replay
from workload.stack import running_stack

pytestmark = pytest.mark.integration
TUNING_PASSES = 3


def _tuned_config(client: redis.Redis, after_version: int, timeout: float) -> dict[int, float] | None:
    """Thresholds of the first stored configuration newer than ``after_version`` that opens a ramp, if one appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        config = read_config(client, RedisKeys(MODEL))
        if config is not None and config.version > after_version and min(config.thresholds.values()) < NEVER_EXIT:
            return config.thresholds
        time.sleep(0.1)
    return None


def test_controller_lowers_thresholds_from_no_exits_within_the_accuracy_budget(
    repository: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    """Tuning traffic until the controller opens ramps, then judged traffic on other images: the served answers
    exit early and stay within budget out of sample. Phases, not a fixed clock, so a slow machine cannot make the
    judged requests all go out before the first tuning round."""
    manifest = load_manifest(repository / MODEL / "1")
    ramps = list(range(len(manifest.ramps)))
    judged_images = test_images[-min(1000, len(test_images) // 3):]
    rest = test_images[: len(test_images) - len(judged_images)]
    tuning_passes = np.array_split(rest, max(1, len(rest) // 2000))[:TUNING_PASSES]  # distinct images in each pass
    # Threshold tuning alone: ramp-set decisions (which may switch exits off on a model this small) are off here.
    controller_args = ["--min-fresh", "300", "--window", "2000", "--adjust-every", "0"]
    with running_stack(repository, models=[MODEL, f"{MODEL}_vanilla"], controller_args=controller_args,
                       log_dir=tmp_path) as stack:
        original = [a.label for a in replay(stack.grpc_url, f"{MODEL}_vanilla", {"IMAGE": judged_images},
                                            poisson_arrivals(len(judged_images), 600))]
        start = publish(stack, {r: NEVER_EXIT for r in ramps})
        client = redis.Redis.from_url(stack.redis_url)
        tuning, tuned = [], None
        for images in tuning_passes:  # until enough feedback lets the guard open a ramp
            tuning += replay(stack.grpc_url, MODEL, {"IMAGE": images}, poisson_arrivals(len(images), 250))
            if (tuned := _tuned_config(client, start.version, timeout=10)) is not None:
                break
        controller_log = stack.process("controller").log.read_text()
        assert tuned is not None, f"thresholds never left 'no exits'; the controller's log:\n{controller_log[-3000:]}"
        judged = replay(stack.grpc_url, MODEL, {"IMAGE": judged_images}, poisson_arrivals(len(judged_images), 250))
    assert all(a.error is None for a in tuning + judged)
    exited = [a for a in judged if a.exit < manifest.final_exit]
    assert exited, f"no judged request exited early under {tuned}"
    accuracy = np.mean([a.label == original[a.index] for a in judged])
    # Out of sample: the judged images never reached the controller before it chose the thresholds in use. The
    # estimate is noisy (about 0.3 points of standard error on 1,000 answers), so the test fails when accuracy is
    # clearly below the 99 % budget: by more than two standard errors.
    standard_error = np.sqrt(0.99 * 0.01 / len(judged))
    assert accuracy >= 0.99 - 2 * standard_error, f"accuracy vs the original model after tuning: {accuracy:.4f}"
