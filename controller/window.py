"""Sliding window of recent feedback for one model and one active ramp set."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from early_exit.feedback import FeedbackRecord


@dataclass(frozen=True)
class WindowView:
    """Concatenated window contents: ``confidence``/``prediction`` ``[R, N]``, ``final``/``exit`` ``[N]``."""

    ramps: tuple[int, ...]
    confidence: np.ndarray
    prediction: np.ndarray
    final: np.ndarray
    exit: np.ndarray
    mean_batch_size: float

    @property
    def size(self) -> int:
        return int(self.final.shape[0])

    def realised_accuracy(self) -> float:
        """Agreement with the original model of the answers actually served (1.0 for an empty window)."""
        if not self.size:
            return 1.0
        row = {ramp: i for i, ramp in enumerate(self.ramps)}
        answered = np.array([self.prediction[row[e], i] if e in row else self.final[i]
                             for i, e in enumerate(self.exit)])
        return float((answered == self.final).mean())


class FeedbackWindow:
    """Keeps the most recent ``capacity`` samples observed with the current active ramp set.

    Every record holds every active ramp's verdict for every sample (the batch runs to the end), so the window is an
    unbiased sample for *any* thresholds over those ramps. When the active set changes, older records lack the new
    ramps and the window restarts.
    """

    def __init__(self, capacity: int = 2000) -> None:
        if capacity <= 0:
            raise ValueError(f"window capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.ramps: tuple[int, ...] | None = None
        self._records: deque[FeedbackRecord] = deque()
        self._samples = 0
        self.fresh = 0

    def add(self, record: FeedbackRecord) -> None:
        if record.ramps != self.ramps:
            self._records.clear()
            self._samples = 0
            self.fresh = 0
            self.ramps = record.ramps
        self._records.append(record)
        self._samples += record.batch_size
        self.fresh += record.batch_size
        while self._records and self._samples - self._records[0].batch_size >= self.capacity:
            self._samples -= self._records.popleft().batch_size

    def __len__(self) -> int:
        return self._samples

    def view(self) -> WindowView:
        ramps = self.ramps or ()
        records = list(self._records)
        if not records:
            empty = np.zeros((len(ramps), 0))
            return WindowView(ramps, empty, empty.astype(int), np.zeros(0, int), np.zeros(0, int), 1.0)
        return WindowView(
            ramps,
            np.concatenate([r.confidence for r in records], axis=1),
            np.concatenate([r.prediction for r in records], axis=1),
            np.concatenate([r.final for r in records]),
            np.concatenate([r.exit for r in records]),
            float(np.mean([r.batch_size for r in records])),
        )
