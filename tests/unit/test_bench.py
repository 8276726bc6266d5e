"""The bench's hindsight yardstick: the best thresholds for known inputs at an agreement floor."""

import numpy as np

from controller.latency import LatencyModel
from controller.tuner import Evaluation, evaluate
from workload.bench import best_thresholds, budget_bound

LATENCY = LatencyModel(block_ms=np.ones(4), ramp_ms=np.full(3, 0.05), ramp_after_block=np.array([0, 1, 2]))


def _verdicts(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ramp 0 agrees with the final layer above confidence 0.7, ramp 1 never, ramp 2 above 0.3."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 10, n)
    confidence = rng.random((3, n))
    agrees = np.stack([confidence[0] > 0.7, np.zeros(n, dtype=bool), confidence[2] > 0.3])
    prediction = np.where(agrees, final, (final + 1) % 10)
    return confidence, prediction, final


def _outcome(thresholds: dict[int, float], confidence: np.ndarray, prediction: np.ndarray,
             final: np.ndarray) -> Evaluation:
    active = list(thresholds)
    return evaluate(np.array(list(thresholds.values())), confidence[active], prediction[active] == final[None, :],
                    LATENCY.exit_latencies(active))


def test_best_thresholds_meet_the_floor_and_spend_the_budget() -> None:
    confidence, prediction, final = _verdicts()
    best = best_thresholds(confidence, prediction, final, LATENCY, [0, 1, 2])
    outcome = _outcome(best, confidence, prediction, final)
    assert 0.99 <= outcome.accuracy < 0.995  # within the budget, and using it: a ceiling, not a safe setting
    assert outcome.saving_ms > 0
    assert budget_bound(confidence, prediction, final, LATENCY) == outcome.saving_ms / LATENCY.vanilla_ms


def test_ramps_that_exit_nothing_are_dropped_so_their_cost_is_not_paid() -> None:
    confidence, prediction, final = _verdicts()
    exact = best_thresholds(confidence, prediction, final, LATENCY, [0, 1, 2], floor=1.0)
    assert sorted(exact) == [0, 2]  # ramp 1 agrees on nothing, so at no loss it cannot exit
    assert exact[0] > 0.7 and exact[2] > 0.3
    assert _outcome(exact, confidence, prediction, final).accuracy == 1.0
    assert best_thresholds(confidence, prediction, final, LATENCY, [1], floor=1.0) == {}


def test_a_higher_floor_is_met_and_never_saves_more() -> None:
    confidence, prediction, final = _verdicts()
    savings = []
    for floor in (0.99, 0.995, 0.999):
        outcome = _outcome(best_thresholds(confidence, prediction, final, LATENCY, [0, 2], floor),
                           confidence, prediction, final)
        assert outcome.accuracy >= floor
        savings.append(outcome.saving_ms)
    assert savings == sorted(savings, reverse=True)


def test_only_the_candidates_are_tuned() -> None:
    confidence, prediction, final = _verdicts()
    assert list(best_thresholds(confidence, prediction, final, LATENCY, [2])) == [2]
