import numpy as np

from controller.guard import AccuracyGuard
from controller.latency import LatencyModel
from controller.prepare.pipeline import answerable_share, choose_initial_ramps


def test_answerable_share_takes_the_most_confident_samples_while_they_keep_the_floor() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    agrees = np.array([1, 1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    # top 4 all agree; the 5th drops the top-k to 80 %; the top 8 are back at 7/8 = 87.5 %
    assert answerable_share(confidence, agrees, 1.0) == 0.4
    assert answerable_share(confidence, agrees, 0.85) == 0.8
    assert answerable_share(confidence, agrees, 0.65) == 1.0


def test_a_ramp_whose_most_confident_sample_disagrees_answers_nothing_at_a_strict_floor() -> None:
    assert answerable_share(np.array([0.9, 0.1]), np.array([False, True]), 0.99) == 0.0
    assert answerable_share(np.array([0.9, 0.1]), np.array([False, True]), 0.5) == 1.0


LATENCY = LatencyModel(block_ms=np.ones(4), ramp_ms=np.full(3, 0.01), ramp_after_block=np.array([0, 1, 2]))


def _validation(confident_share: list[float], n: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ramp, the first ``confident_share`` of the samples agree with the final answer at confidence 0.99; the
    others are a coin toss at confidence 0.5 (every other pair disagrees, so both halves of the interleaved
    validation split see as many disagreements)."""
    final = np.zeros(n, dtype=int)
    confidence = np.full((len(confident_share), n), 0.5, dtype=np.float32)  # as ramps report it
    prediction = np.tile(np.arange(n) // 2 % 2, (len(confident_share), 1))
    for ramp, share in enumerate(confident_share):
        confidence[ramp, : int(share * n)] = 0.99
        prediction[ramp, : int(share * n)] = 0
    return confidence, prediction, final


def test_the_initial_ramp_is_the_one_the_median_request_takes_not_the_shallowest_saver() -> None:
    """Ramp 0 saves more on the mean (30 % of inputs skip three blocks) but the median input passes it and pays its
    head; ramp 2 answers 70 % of them a block early."""
    confidence, prediction, final = _validation([0.3, 0.0, 0.7])
    guard = AccuracyGuard(budget=0.01, z=0.0)
    one_ramp = 0.003  # of the 4 ms pass: room for one 0.01 ms head
    assert list(choose_initial_ramps(LATENCY, confidence, prediction, final, guard, one_ramp)) == [2]
    assert list(choose_initial_ramps(LATENCY, confidence, prediction, final, guard, 0.02)) == [0, 2]


def test_no_initial_ramp_when_none_moves_the_median_request() -> None:
    confidence, prediction, final = _validation([0.3, 0.2, 0.4])
    assert choose_initial_ramps(LATENCY, confidence, prediction, final, AccuracyGuard(z=0.0), 0.02) == {}


def test_initial_thresholds_hold_on_the_validation_half_they_were_not_tuned_on() -> None:
    """Ramp 2 answers 600 inputs at confidence 0.95, all agreeing, and 200 at 0.85 with 10 disagreements: 3 on the
    half the thresholds are tuned on (interleaved: even positions), 7 on the other. Over all 1,000 inputs, opening
    both bands meets the budget exactly (99.0 %); on the held-out half it serves 98.6 %, so only the first band
    opens."""
    confidence, prediction, final = _validation([0.0, 0.0, 0.0])
    confidence[2, :600], prediction[2, :600] = 0.95, 0
    confidence[2, 600:800], prediction[2, 600:800] = 0.85, 0
    prediction[2, [600, 602, 604, 601, 603, 605, 607, 609, 611, 613]] = 1
    guard = AccuracyGuard(budget=0.01, z=0.0)
    initial = choose_initial_ramps(LATENCY, confidence, prediction, final, guard, 0.02)
    assert list(initial) == [2]
    assert 0.9 < initial[2] <= 0.95  # float32 0.95, not 0.85
