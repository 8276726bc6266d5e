"""The one exit rule: first ramp at or above its threshold, ``NEVER_EXIT`` never exits, no ramps means the end."""

from __future__ import annotations

import numpy as np

from early_exit.exit_rule import NEVER_EXIT, TIGHTEST_OPEN, exits_at, first_exit, served_predictions


def test_first_exit_takes_the_shallowest_confident_ramp_and_never_exit_closes_a_ramp() -> None:
    confidence = np.array([[0.92, 0.2, 1.0], [0.95, 0.85, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(first_exit(confidence, np.array([0.9, 0.8])), [0, 1, 0])
    np.testing.assert_array_equal(first_exit(confidence, np.array([NEVER_EXIT, NEVER_EXIT])), [2, 2, 2])
    batched = first_exit(confidence, np.array([[0.9, 0.8], [NEVER_EXIT, 0.9]]))
    np.testing.assert_array_equal(batched, [[0, 1, 0], [1, 2, 1]])


def test_the_tightest_open_threshold_lets_exactly_the_confidences_rounded_to_one_exit() -> None:
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
    confidence = np.array([1.0, below_one, np.nextafter(below_one, np.float32(0.0))], dtype=np.float32)
    np.testing.assert_array_equal(exits_at(confidence, TIGHTEST_OPEN), [True, True, False])
    np.testing.assert_array_equal(exits_at(confidence, np.float64(TIGHTEST_OPEN)), [True, True, False])
    assert not exits_at(confidence, NEVER_EXIT).any()


def test_without_active_ramps_every_sample_gets_the_original_answer() -> None:
    first = first_exit(np.empty((0, 3), dtype=np.float32), np.empty(0))
    np.testing.assert_array_equal(first, [0, 0, 0])
    np.testing.assert_array_equal(first_exit(np.empty((0, 2)), np.empty((4, 0))), np.zeros((4, 2)))
    final = np.array([3, 1, 4])
    np.testing.assert_array_equal(served_predictions(np.empty((0, 3), dtype=int), final, first), final)
