"""Sliding window of recent feedback for one model and one active ramp set."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from early_exit.exit_rule import served_predictions
from early_exit.feedback import FeedbackRecord


@dataclass(frozen=True)
class WindowView:
    """Concatenated window contents.

    Per sample: ``confidence``/``prediction`` ``[R, N]``, ``final``, ``exit`` (ramp id or the final exit),
    ``version`` (configuration it was served under), ``answer_ms`` and, repeated from its batch, ``batch_ms``,
    ``overhead_ms``, ``tail_ms`` and ``batch_size``, and ``sequence``, its position in the stream since the window
    (re)started: stable while the sample stays in the window, so a split by it puts a sample on the same side in every
    round. ``busy`` is the share of wall time the instance spent executing batches over the window, batches that
    sent no record included.
    """

    ramps: tuple[int, ...]
    confidence: np.ndarray
    prediction: np.ndarray
    final: np.ndarray
    exit: np.ndarray
    version: np.ndarray
    answer_ms: np.ndarray
    batch_ms: np.ndarray
    overhead_ms: np.ndarray
    tail_ms: np.ndarray
    batch_size: np.ndarray
    sequence: np.ndarray
    mean_batch_size: float
    busy: float

    @property
    def size(self) -> int:
        return int(self.final.shape[0])

    def served(self) -> np.ndarray:
        """The prediction each sample was answered with (its exit ramp's, or the final layer's)."""
        lookup = np.full(max(int(self.exit.max(initial=0)), *self.ramps, 0) + 1, len(self.ramps))
        lookup[list(self.ramps)] = np.arange(len(self.ramps))
        return served_predictions(self.prediction, self.final, lookup[self.exit])

    def realised_accuracy(self, since_version: int = 0) -> tuple[float, int]:
        """Agreement with the original model of the answers served under configurations ``>= since_version``, and
        how many answers that is (``(1.0, 0)`` when none)."""
        chosen = self.version >= since_version
        count = int(chosen.sum())
        if not count:
            return 1.0, 0
        return float((self.served()[chosen] == self.final[chosen]).mean()), count

    def newest(self, samples: int) -> WindowView:
        """The latest ``samples`` samples (all of them when there are fewer)."""
        return self.subset(np.arange(max(self.size - samples, 0), self.size))

    def subset(self, index: np.ndarray) -> WindowView:
        """The samples at ``index`` (same ramps, batch-level figures kept)."""
        return WindowView(self.ramps, self.confidence[:, index], self.prediction[:, index], self.final[index],
                          self.exit[index], self.version[index], self.answer_ms[index], self.batch_ms[index],
                          self.overhead_ms[index], self.tail_ms[index], self.batch_size[index], self.sequence[index],
                          self.mean_batch_size, self.busy)


class FeedbackWindow:
    """Keeps the most recent ``capacity`` samples observed with the current active ramp set.

    Every record holds every active ramp's verdict for every sample (the batch runs to the end), so the window is an
    unbiased sample for *any* thresholds over those ramps. When the active set changes, older records lack the new
    ramps and the window restarts. It also counts the samples it holds per serving replica (``replicas``), so the
    controller of many Triton replicas can tell whose feedback it tunes on.
    """

    def __init__(self, capacity: int = 2000) -> None:
        if capacity <= 0:
            raise ValueError(f"window capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.ramps: tuple[int, ...] | None = None
        self._records: deque[FeedbackRecord] = deque()
        self._samples = 0
        self._first = 0  # sequence number of the oldest sample held
        self._replicas: Counter[str] = Counter()  # samples held per replica
        self.fresh = 0

    def add(self, record: FeedbackRecord, fresh: bool = True) -> None:
        """Keep ``record``'s samples, counting them in ``fresh`` (towards the next round) when ``fresh``."""
        if record.ramps != self.ramps:
            self.clear()
            self.ramps = record.ramps
        self._records.append(record)
        self._samples += record.batch_size
        self._replicas[record.replica] += record.batch_size
        self.fresh += record.batch_size if fresh else 0
        self.keep_latest(self.capacity)

    def keep_latest(self, samples: int) -> None:
        """Drop the oldest records while at least ``samples`` samples would remain."""
        while self._records and self._samples - self._records[0].batch_size >= samples:
            oldest = self._records.popleft()
            self._samples -= oldest.batch_size
            self._first += oldest.batch_size
            self._replicas[oldest.replica] -= oldest.batch_size
            if self._replicas[oldest.replica] <= 0:
                del self._replicas[oldest.replica]

    def clear(self) -> None:
        self._records.clear()
        self._samples = 0
        self._first = 0
        self._replicas.clear()
        self.fresh = 0

    @property
    def replicas(self) -> dict[str, int]:
        """Samples held per serving replica (``""``: records of a backend that names none)."""
        return dict(self._replicas)

    def __len__(self) -> int:
        return self._samples

    def view(self) -> WindowView:
        ramps = self.ramps or ()
        records = list(self._records)
        if not records:
            empty = np.zeros(0)
            return WindowView(ramps, np.zeros((len(ramps), 0)), np.zeros((len(ramps), 0), int), empty.astype(int),
                              empty.astype(int), empty.astype(int), empty, empty, empty, empty, empty.astype(int),
                              empty.astype(int), 1.0, 0.0)
        sizes = [r.batch_size for r in records]
        # What the first record says happened before its batch (waits, batches that sent no record) precedes the window.
        busy_ms = sum(r.timing.batch_ms for r in records) + sum(r.timing.unreported_ms for r in records[1:])
        idle_ms = sum(r.timing.idle_ms for r in records[1:])
        return WindowView(
            ramps,
            np.concatenate([r.confidence for r in records], axis=1),
            np.concatenate([r.prediction for r in records], axis=1),
            np.concatenate([r.final for r in records]),
            np.concatenate([r.exit for r in records]),
            np.repeat([r.config_version for r in records], sizes),
            np.concatenate([r.timing.answer_ms for r in records]),
            np.repeat([r.timing.batch_ms for r in records], sizes),
            np.repeat([r.timing.overhead_ms for r in records], sizes),
            np.repeat([r.timing.tail_ms for r in records], sizes),
            np.repeat(sizes, sizes),
            np.arange(self._first, self._first + self._samples),
            float(np.mean(sizes)),
            busy_ms / max(busy_ms + idle_ms, 1e-9),
        )
