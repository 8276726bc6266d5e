"""ThresholdTuner: close to brute force, inside the guard, warm starts that do not churn, and ties broken by saving."""

import itertools

import numpy as np
import pytest

from controller.guard import AccuracyGuard
from controller.tuner import ThresholdTuner, TunerSettings, _Climb, descending_order, evaluate, tune_held_out
from early_exit.exit_rule import NEVER_EXIT


def _window(rng: np.random.Generator, ramps: int, n: int):
    final = rng.integers(0, 10, n)
    confidence = rng.random((ramps, n)).astype(np.float32)
    quality = np.linspace(0.4, 0.95, ramps)[:, None]
    agree = rng.random((ramps, n)) < np.clip(quality + 0.5 * (confidence - 0.5), 0, 1)
    prediction = np.where(agree, final, (final + 1) % 10)
    exit_ms = np.append(np.linspace(1.0, 0.9 * ramps, ramps), ramps + 1.0)
    return confidence, prediction, final, exit_ms


def _brute_force(guard, confidence, prediction, final, exit_ms, grid):
    best_saving = 0.0
    correct = prediction == final[None, :]
    n = len(final)
    for combo in itertools.product(grid, repeat=confidence.shape[0]):
        evaluation = evaluate(np.array(combo), confidence, correct, exit_ms)
        if guard.admits(round(evaluation.accuracy * n), n) and evaluation.saving_ms > best_saving:
            best_saving = evaluation.saving_ms
    return best_saving


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_close_to_brute_force_and_respects_budget(seed: int) -> None:
    rng = np.random.default_rng(seed)
    confidence, prediction, final, exit_ms = _window(rng, 2, 400)
    guard = AccuracyGuard(budget=0.05, z=0.0)
    tuner = ThresholdTuner(TunerSettings(guard=guard))
    thresholds = tuner.tune(confidence, prediction, final, exit_ms)
    got = evaluate(thresholds, confidence, prediction == final, exit_ms)
    grid = np.append(np.unique(confidence), NEVER_EXIT)  # every distinct outcome is reachable on this grid
    best_saving = _brute_force(guard, confidence, prediction, final, exit_ms, grid[:: max(1, len(grid) // 200)])
    assert got.accuracy >= 0.95
    assert got.saving_ms >= 0.9 * best_saving


def test_incremental_bookkeeping_matches_a_full_evaluation() -> None:
    """The climb tracks agreement and saving incrementally; a full re-evaluation of its result must agree."""
    rng = np.random.default_rng(3)
    confidence, prediction, final, exit_ms = _window(rng, 6, 1500)
    guard = AccuracyGuard(budget=0.02, z=1.0)
    thresholds = ThresholdTuner(TunerSettings(guard=guard)).tune(confidence, prediction, final, exit_ms)
    full = evaluate(thresholds, confidence, prediction == final, exit_ms)
    assert guard.admits(round(full.accuracy * 1500), 1500)
    assert full.saving_ms > 0


@pytest.mark.parametrize("seed", range(3))
def test_the_climbs_running_totals_match_a_full_evaluation_from_any_start(seed: int) -> None:
    """The climb prices moves from per-position gains it rewrites after each move; the saving it reports must be
    what a full evaluation of its thresholds gives, from "no exits" and from admitted thresholds in use, including
    on confidences with many ties (which move together), of exactly 1.0, and NaN (a malformed input's). From
    thresholds the guard does not admit it does not climb at all."""
    rng = np.random.default_rng(seed)
    confidence, prediction, final, exit_ms = _window(rng, 7, 1200)
    confidence = np.round(confidence, 2).astype(np.float32)  # a hundred distinct values: plateaus, some at 1.0
    confidence[rng.random(confidence.shape) < 0.01] = np.nan
    settings = TunerSettings(guard=AccuracyGuard(0.03, 1.0))
    climb = _Climb(confidence, prediction, final, exit_ms)
    correct = prediction == final[None, :]
    stricter = ThresholdTuner(TunerSettings(guard=AccuracyGuard(0.01, 1.0)))
    tuned = ThresholdTuner(settings).tune(confidence, prediction, final, exit_ms)
    starts = [np.full(7, NEVER_EXIT), stricter.tune(confidence, prediction, final, exit_ms), tuned + 0.02]
    climbed = 0
    for start in np.minimum(starts, NEVER_EXIT):
        before = evaluate(start, confidence, correct, exit_ms)
        result = climb.run(start, 0.1, settings)
        if not settings.guard.admits(round(before.accuracy * 1200), 1200):
            assert result is None
            continue
        thresholds, saving = result
        full = evaluate(thresholds, confidence, correct, exit_ms)
        assert saving == pytest.approx(full.saving_ms, abs=1e-9)
        assert settings.guard.admits(round(full.accuracy * 1200), 1200)
        climbed += int(full.saving_ms > before.saving_ms)
    assert climbed >= 2  # at least from "no exits" and from the stricter guard's thresholds it found more saving


def test_descending_order_sorts_each_row_like_a_comparison_sort() -> None:
    """The radix sort of the float bits orders every row as a comparison sort would: ties, zeros of both signs,
    negative values (the climb's stand-in for NaN), subnormals and the largest float32 below 1.0."""
    rng = np.random.default_rng(11)
    confidence = rng.random((5, 3000)).astype(np.float32)
    confidence[:, :200] = np.round(confidence[:, :200], 1)
    confidence[0, :4] = [0.0, -0.0, -1.0, np.float32(1e-42)]
    confidence[1, :3] = [np.nextafter(np.float32(1), np.float32(0)), -0.5, -1.0]
    order = descending_order(confidence)
    assert (np.sort(order, axis=1) == np.arange(3000)).all()  # a permutation of every row
    np.testing.assert_array_equal(np.take_along_axis(confidence, order, axis=1), -np.sort(-confidence, axis=1))


def test_no_affordable_exit_keeps_every_ramp_closed() -> None:
    final = np.zeros(100, dtype=int)
    prediction = np.ones((2, 100), dtype=int)  # ramps always disagree with the original model
    confidence = np.full((2, 100), 0.99, dtype=np.float32)
    thresholds = ThresholdTuner().tune(confidence, prediction, final, np.array([1.0, 2.0, 3.0]))
    assert (thresholds == NEVER_EXIT).all()


def test_perfect_ramps_exit_everything_at_the_first_ramp() -> None:
    final = np.arange(1000) % 10
    prediction = np.stack([final, final])
    confidence = np.full((2, 1000), 0.6, dtype=np.float32)
    thresholds = ThresholdTuner().tune(confidence, prediction, final, np.array([1.0, 2.0, 3.0]))
    assert thresholds[0] <= np.float32(0.6) and thresholds[1] == NEVER_EXIT


def test_free_moves_prefer_the_larger_saving_not_the_shallower_ramp() -> None:
    """Both ramps agree perfectly (zero accuracy cost): the deeper ramp 1 saves less per sample than ramp 0, but
    only ramp 0's samples are a few; the first move must take the one that saves more in total."""
    final = np.zeros(1000, dtype=int)
    prediction = np.zeros((2, 1000), dtype=int)
    confidence = np.stack([np.where(np.arange(1000) < 10, 0.95, 0.1), np.full(1000, 0.95)]).astype(np.float32)
    tuner = ThresholdTuner(TunerSettings(guard=AccuracyGuard(0.01, 0.0), initial_steps=(0.1,), max_rounds=1))
    thresholds = tuner.tune(confidence, prediction, final, np.array([1.0, 2.0, 10.0]))
    assert thresholds[1] < NEVER_EXIT and thresholds[0] == NEVER_EXIT


def test_lower_bound_is_more_conservative_than_point_estimate() -> None:
    rng = np.random.default_rng(7)
    confidence, prediction, final, exit_ms = _window(rng, 4, 300)
    point = ThresholdTuner(TunerSettings(guard=AccuracyGuard(0.02, 0.0))).tune(confidence, prediction, final, exit_ms)
    bound = ThresholdTuner(TunerSettings(guard=AccuracyGuard(0.02, 1.645))).tune(confidence, prediction, final,
                                                                                  exit_ms)
    correct = prediction == final[None, :]
    assert evaluate(bound, confidence, correct, exit_ms).accuracy >= evaluate(point, confidence, correct,
                                                                              exit_ms).accuracy


def test_warm_start_keeps_good_thresholds_instead_of_churning() -> None:
    rng = np.random.default_rng(5)
    confidence, prediction, final, exit_ms = _window(rng, 8, 2000)
    tuner = ThresholdTuner(TunerSettings(guard=AccuracyGuard(0.01, 1.0)))
    first = tuner.tune(confidence, prediction, final, exit_ms)
    again = tuner.tune(confidence, prediction, final, exit_ms, current=first)
    np.testing.assert_array_equal(again, first)


def test_settings_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="budget"):
        AccuracyGuard(budget=1.5)
    with pytest.raises(ValueError, match="initial_steps"):
        TunerSettings(initial_steps=(0.0,))


@pytest.mark.parametrize("seed", range(3))
def test_held_out_tuning_returns_only_what_the_held_out_samples_admit(seed: int) -> None:
    confidence, prediction, final, exit_ms = _window(np.random.default_rng(seed), 3, 2000)
    settings = TunerSettings(guard=AccuracyGuard(budget=0.02, z=1.0))
    held_out = np.arange(2000) % 2 == 1
    thresholds = tune_held_out(settings, confidence, prediction, final, exit_ms, held_out)
    assert thresholds is not None and (thresholds < NEVER_EXIT).any()
    correct = prediction[:, held_out] == final[None, held_out]
    accuracy = evaluate(thresholds, confidence[:, held_out], correct, exit_ms).accuracy
    assert settings.guard.admits(round(accuracy * 1000), 1000)


def test_held_out_tuning_refuses_a_ramp_that_is_right_only_on_the_samples_it_was_chosen_on() -> None:
    n = 2000
    held_out = np.arange(n) % 2 == 1
    final = np.zeros(n, dtype=int)
    confidence = np.full((1, n), 0.9, dtype=np.float32)
    prediction = np.where(held_out & (np.arange(n) % 10 == 1), 1, 0)[None, :]  # wrong on a fifth of the held-out
    settings = TunerSettings(guard=AccuracyGuard(budget=0.01, z=1.0))
    exit_ms = np.array([1.0, 10.0])
    # chosen and judged on the same samples, the ramp looks perfect
    assert ThresholdTuner(settings).tune(confidence[:, ~held_out], prediction[:, ~held_out], final[~held_out],
                                         exit_ms)[0] < NEVER_EXIT
    # held out, it is refused at every halving of the budget, until the halved budget cannot open anything at all
    chosen = tune_held_out(settings, confidence, prediction, final, exit_ms, held_out)
    assert chosen is not None and (chosen == NEVER_EXIT).all()


def _overfit_window() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One ramp, 2,000 samples at confidences spread over [0, 1): the chosen half disagrees only below 0.5, so the
    climb's free moves lower the threshold to ~0.5 at any budget; the held-out half disagrees 10 times between 0.5
    and 0.7 (6 of 1,000 admitted), and never above."""
    n = 2000
    held_out = np.arange(n) % 2 == 1
    confidence = np.random.default_rng(7).permutation(np.linspace(0.0, 1.0, n, endpoint=False))
    final = np.zeros(n, dtype=int)
    band = np.flatnonzero(held_out & (confidence > 0.5) & (confidence < 0.7))
    wrong = np.zeros(n, dtype=bool)
    wrong[band[:: len(band) // 10][:10]] = True
    wrong |= ~held_out & (confidence < 0.5) & (np.arange(n) % 20 == 0)
    prediction = np.where(wrong, 1, 0)[None, :]
    return confidence.astype(np.float32)[None, :], prediction, final, np.array([1.0, 10.0]), held_out


def test_held_out_tuning_from_no_exits_backs_off_a_choice_every_halving_overfits() -> None:
    confidence, prediction, final, exit_ms, held_out = _overfit_window()
    assert (prediction[0] != final)[held_out].sum() == 10
    settings = TunerSettings(guard=AccuracyGuard(budget=0.01, z=1.0))
    chosen = tune_held_out(settings, confidence, prediction, final, exit_ms, held_out, np.array([NEVER_EXIT]))
    assert chosen is not None and 0.7 <= chosen[0] < NEVER_EXIT  # above every held-out disagreement, and open
    correct = prediction[:, held_out] == final[None, held_out]
    assert evaluate(chosen, confidence[:, held_out], correct, exit_ms).accuracy == 1.0


def test_held_out_tuning_with_exits_open_does_not_back_off_to_a_tighter_choice() -> None:
    """The caller keeps open thresholds (or backs them off on a breach) when nothing is certified."""
    confidence, prediction, final, exit_ms, held_out = _overfit_window()
    settings = TunerSettings(guard=AccuracyGuard(budget=0.01, z=1.0))
    chosen = tune_held_out(settings, confidence, prediction, final, exit_ms, held_out, np.array([0.6]))
    assert chosen is None or (chosen == NEVER_EXIT).all()


def test_evaluation_prices_the_median_sample_apart_from_the_mean() -> None:
    """Two samples of five exit at the ramp: the mean gains, the median sample runs to the final layer."""
    exit_ms = np.array([1.0, 4.5])  # the ramp's answer, the final layer's
    confidence = np.array([[0.9, 0.9, 0.1, 0.1, 0.1]], dtype=np.float32)
    outcome = evaluate(np.array([0.5]), confidence, np.ones((1, 5), dtype=bool), exit_ms)
    assert outcome.saving_ms == pytest.approx(0.4 * 3.5)
    assert outcome.median_saving_ms == 0.0
    assert outcome.assured_saving_ms == 0.0
