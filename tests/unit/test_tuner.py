import itertools
import time

import numpy as np
import pytest

from controller.tuner import ThresholdTuner, TunerSettings, wilson_lower
from early_exit.exit_config import NEVER_EXIT


def _window(rng: np.random.Generator, ramps: int, n: int):
    final = rng.integers(0, 10, n)
    confidence = rng.random((ramps, n)).astype(np.float32)
    quality = np.linspace(0.4, 0.95, ramps)[:, None]
    agree = rng.random((ramps, n)) < np.clip(quality + 0.5 * (confidence - 0.5), 0, 1)
    prediction = np.where(agree, final, (final + 1) % 10)
    exit_ms = np.append(np.linspace(1.0, 0.9 * ramps, ramps), ramps + 1.0)
    return confidence, prediction, final, exit_ms


def _brute_force(tuner, confidence, prediction, final, exit_ms, grid):
    best, best_saving = None, -1.0
    correct = prediction == final[None, :]
    for combo in itertools.product(grid, repeat=confidence.shape[0]):
        evaluation = tuner.evaluate(np.array(combo), confidence, correct, exit_ms)
        if evaluation.accuracy >= 1 - tuner.settings.budget and evaluation.saving_ms > best_saving:
            best, best_saving = combo, evaluation.saving_ms
    return best, best_saving


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_close_to_brute_force_and_respects_budget(seed: int) -> None:
    rng = np.random.default_rng(seed)
    confidence, prediction, final, exit_ms = _window(rng, 2, 400)
    tuner = ThresholdTuner(TunerSettings(budget=0.05))
    thresholds = tuner.tune(confidence, prediction, final, exit_ms)
    got = tuner.evaluate(thresholds, confidence, prediction == final, exit_ms)
    grid = np.append(np.unique(confidence), NEVER_EXIT)  # every distinct outcome is reachable on this grid
    _, best_saving = _brute_force(tuner, confidence, prediction, final, exit_ms, grid[:: max(1, len(grid) // 200)])
    assert got.accuracy >= 0.95
    assert got.saving_ms >= 0.9 * best_saving


def test_no_affordable_exit_keeps_every_ramp_closed() -> None:
    final = np.zeros(100, dtype=int)
    prediction = np.ones((2, 100), dtype=int)  # ramps always disagree with the original model
    confidence = np.full((2, 100), 0.99, dtype=np.float32)
    thresholds = ThresholdTuner().tune(confidence, prediction, final, np.array([1.0, 2.0, 3.0]))
    assert (thresholds == NEVER_EXIT).all()


def test_perfect_ramps_exit_everything_at_the_first_ramp() -> None:
    final = np.arange(100) % 10
    prediction = np.stack([final, final])
    confidence = np.full((2, 100), 0.6, dtype=np.float32)
    thresholds = ThresholdTuner().tune(confidence, prediction, final, np.array([1.0, 2.0, 3.0]))
    assert thresholds[0] <= np.float32(0.6) and thresholds[1] == NEVER_EXIT


def test_lower_bound_is_more_conservative_than_point_estimate() -> None:
    rng = np.random.default_rng(7)
    confidence, prediction, final, exit_ms = _window(rng, 4, 300)
    point = ThresholdTuner(TunerSettings(budget=0.02)).tune(confidence, prediction, final, exit_ms)
    bound = ThresholdTuner(TunerSettings(budget=0.02, z=1.645)).tune(confidence, prediction, final, exit_ms)
    evaluate = ThresholdTuner().evaluate
    correct = prediction == final[None, :]
    assert evaluate(bound, confidence, correct, exit_ms).accuracy >= evaluate(point, confidence, correct, exit_ms).accuracy
    assert wilson_lower(np.array([99.0]), 100, 1.645)[0] < 0.99


def test_tuning_a_large_window_is_fast() -> None:
    rng = np.random.default_rng(1)
    confidence, prediction, final, exit_ms = _window(rng, 16, 2000)
    tuner = ThresholdTuner(TunerSettings(initial_steps=(0.05,)))
    started = time.perf_counter()
    tuner.tune(confidence, prediction, final, exit_ms)
    assert time.perf_counter() - started < 5.0  # generous: a functional bound, the benchmark reports real numbers


def test_settings_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="budget"):
        TunerSettings(budget=1.5)
    with pytest.raises(ValueError, match="initial_steps"):
        TunerSettings(initial_steps=(0.0,))
