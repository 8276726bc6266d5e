"""The accuracy guard, written once: what "within the accuracy budget" means for ``prepare`` and the controller.

Accuracy is agreement with the original model's prediction. The guard admits a threshold vector when the Wilson
lower confidence bound of its agreement on ``n`` samples is at least ``1 - budget``; with ``z = 0`` it is the paper's
point estimate. Closing needs the mirror image: the upper bound below ``1 - budget``. Between the two, what is in
use stays. A window too small for even a perfect record to pass cannot decide anything, and the caller must then
keep what it has rather than close every exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def wilson_lower(successes: np.ndarray | float, n: int, z: float) -> np.ndarray:
    """Wilson score lower bound of a binomial proportion (elementwise); ``z < 0`` gives the upper bound."""
    p = np.asarray(successes, dtype=float) / n
    if z == 0:
        return p
    denominator = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(np.clip(p * (1 - p), 0, None) / n + z * z / (4 * n * n))
    return (centre - margin) / denominator


@dataclass(frozen=True)
class AccuracyGuard:
    """Args:
    budget: maximum accuracy loss vs the original model (0.01 = 1 %).
    z: normal quantile of the lower confidence bound (0: point estimate; 1.645: one-sided 95 %).
    """

    budget: float = 0.01
    z: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget < 1.0:
            raise ValueError(f"budget must be in [0, 1), got {self.budget}")
        if self.z < 0:
            raise ValueError(f"z must be >= 0, got {self.z}")

    @property
    def floor(self) -> float:
        return 1.0 - self.budget

    def admits(self, agreeing: np.ndarray | float, n: int) -> np.ndarray:
        """Whether ``agreeing`` answers out of ``n`` satisfy the budget (elementwise): the evidence needed to open."""
        return wilson_lower(agreeing, n, self.z) >= self.floor - 1e-12

    def breached(self, agreeing: float, n: int) -> bool:
        """Whether ``agreeing`` answers out of ``n`` are clearly below the budget (the upper bound is): the evidence
        needed to close. Between the two bounds the guard keeps what is in use, so noise does not churn exits."""
        return n > 0 and bool(wilson_lower(agreeing, n, -self.z) < self.floor - 1e-12)

    @property
    def min_samples(self) -> int:
        """Smallest window on which a perfect record passes; below it the guard cannot decide."""
        if self.z == 0:
            return 1
        # Wilson bound of p = 1 is n / (n + z^2) >= floor  <=>  n >= floor * z^2 / (1 - floor)
        return max(1, math.ceil(self.floor * self.z * self.z / max(self.budget, 1e-12)))

    def min_agreeing(self, n: int) -> int:
        """Fewest agreeing answers out of ``n`` that the guard admits (``n + 1`` when none does)."""
        admitted = self.admits(np.arange(n + 1), n)  # monotone in the number of agreeing answers
        return int(admitted.argmax()) if admitted.any() else n + 1

    def decidable(self, n: int) -> bool:
        return n >= self.min_samples
