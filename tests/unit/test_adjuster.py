import numpy as np

from controller.adjuster import AdjusterSettings, RampAdjuster, ramp_utilities
from controller.latency import LatencyModel


def _latency() -> LatencyModel:
    # 5 blocks of 2 ms, 4 candidate ramps of 0.05 ms after blocks 0..3
    return LatencyModel(np.full(5, 2.0), np.full(4, 0.05), np.arange(4))


def test_utility_is_saving_of_exits_minus_cost_of_passing() -> None:
    confidence = np.array([[0.99, 0.1, 0.1, 0.1]], dtype=np.float32)  # one ramp after block 1; 1 of 4 exits
    utilities = ramp_utilities([1], np.array([0.9]), confidence, _latency())
    final_ms = 10.0 + 0.05
    exit_ms = 4.0 + 0.05
    assert np.isclose(utilities[0], ((final_ms - exit_ms) * 1 - 0.05 * 3) / 4)


def test_useless_ramps_are_dropped_and_a_neighbour_of_a_useful_one_is_tried() -> None:
    latency = _latency()
    confidence = np.array([[0.1] * 10, [0.99] * 5 + [0.1] * 5], dtype=np.float32)  # ramp 0 never exits, ramp 2 does
    adjuster = RampAdjuster(4, AdjusterSettings(overhead_budget=0.02, max_ramps=3))
    proposal = adjuster.propose([0, 2], np.array([0.9, 0.9]), confidence, latency)
    assert proposal is not None and 0 not in proposal and 2 in proposal and len(proposal) == 2


def test_budget_limits_added_ramps() -> None:
    latency = _latency()
    confidence = np.array([[0.99] * 10], dtype=np.float32)
    adjuster = RampAdjuster(4, AdjusterSettings(overhead_budget=0.004))  # room for one 0.05 ms ramp only
    assert adjuster.propose([2], np.array([0.9]), confidence, latency) is None
