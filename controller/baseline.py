"""The live baseline of measured savings: what the fused graph (every exit off) takes per batch, at the current load.

The backend serves a small share of its traced batches on the fused graph while exits are on (``control_share``),
and every batch while exits are off. Their times, per batch size, are what the batches served with ramps would have
taken without them, measured on the same machine at the same load; a saving measured against them includes every
cost of the ramps, also those the backend cannot time (the model run as segments instead of one graph), which under
load were several times the ramp heads' own time.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

import numpy as np

from early_exit.feedback import FeedbackRecord


class FusedBaseline:
    """Mean time of the latest fused-graph batches of each size.

    Args:
        per_size: batches kept per batch size: the latest of them (a few minutes of control batches at a moderate
            load), so the mean follows the machine's speed.
        min_batches: batches of a size needed before its mean is used; until then ``ms`` has no estimate for it.
    """

    def __init__(self, per_size: int = 64, min_batches: int = 8) -> None:
        if not 0 < min_batches <= per_size:
            raise ValueError(f"need 0 < min_batches <= per_size, got {min_batches} and {per_size}")
        self.min_batches = min_batches
        self._times: defaultdict[int, deque[float]] = defaultdict(lambda: deque(maxlen=per_size))

    def add(self, record: FeedbackRecord) -> None:
        """Record the batch time of ``record`` if its batch ran on the fused graph (no active ramp)."""
        if not record.ramps:
            self._times[record.batch_size].append(record.timing.batch_ms)

    def ms(self, batch_sizes: np.ndarray) -> np.ndarray:
        """The fused graph's mean batch time for each of ``batch_sizes``; NaN where too few batches of that size were
        measured."""
        return self._per_size(batch_sizes, np.mean)

    def variance_of_mean(self, batch_sizes: np.ndarray) -> np.ndarray:
        """The squared standard error of ``ms`` for each of ``batch_sizes`` (NaN where ``ms`` is). Batch times on a
        shared CPU are far from constant (on this project's 2-core machine a batch of one runs ~7 or ~17 ms, depending
        on whether an idle core must wake up first), and a few dozen control batches leave their mean uncertain by
        more than what exits save on a model like the ResNet-56 reference."""
        return self._per_size(batch_sizes, lambda times: np.var(times, ddof=1) / len(times))

    def _per_size(self, batch_sizes: np.ndarray, statistic: Callable[[np.ndarray], float]) -> np.ndarray:
        values = {size: float(statistic(np.asarray(times))) for size, times in self._times.items()
                  if len(times) >= self.min_batches}
        return np.array([values.get(int(size), np.nan) for size in batch_sizes], dtype=float)
