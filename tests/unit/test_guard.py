"""AccuracyGuard: the Wilson bound, the smallest decidable window and the fewest agreeing answers admitted."""

import numpy as np

from controller.guard import AccuracyGuard, wilson_lower


def test_lower_bound_is_below_the_point_estimate_and_tightens_with_n() -> None:
    assert wilson_lower(99.0, 100, 1.645) < 0.99
    assert wilson_lower(990.0, 1000, 1.645) > wilson_lower(99.0, 100, 1.645)
    assert wilson_lower(99.0, 100, 0.0) == 0.99


def test_min_samples_is_the_smallest_window_a_perfect_record_passes() -> None:
    guard = AccuracyGuard(0.01, 1.645)
    n = guard.min_samples
    assert guard.admits(n, n) and not guard.admits(n - 1, n - 1)
    assert not guard.decidable(n - 1) and guard.decidable(n)
    assert AccuracyGuard(0.01, 0.0).min_samples == 1


def test_min_agreeing_is_the_admission_boundary() -> None:
    guard = AccuracyGuard(0.02, 1.0)
    for n in (50, 400, 2000):
        k = guard.min_agreeing(n)
        assert bool(guard.admits(k, n)) and (k == 0 or not guard.admits(k - 1, n))
    assert np.all(guard.admits(np.array([2000, 1999]), 2000))
    assert AccuracyGuard(0.01, 1.645).min_agreeing(100) == 101  # too few samples for even a perfect record


def test_closing_needs_clear_evidence_of_a_breach() -> None:
    guard = AccuracyGuard(0.01, 1.0)
    assert not guard.breached(256, 259)  # 98.8 % on 259 answers: within noise of 99 %
    assert guard.breached(240, 259)  # 92.7 %: clearly below
    assert not guard.breached(0, 0)
