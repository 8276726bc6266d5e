"""Custom metrics on Triton's Prometheus endpoint (``/metrics`` on the metrics port).

``triton_python_backend_utils`` only exists inside the Triton stub, so it is passed in rather than imported here.
A ``MetricFamily`` must outlive its metrics, so this object keeps both. Every metric update is a round trip from the
stub to the server process, so per-batch counts (exits, feedback) are accumulated in memory and flushed by a
background thread twice a second; rare events (configuration applied or rejected) are reported at once.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class BackendMetrics:
    """Counters and gauges of one model instance.

    Args:
        pb_utils: the ``triton_python_backend_utils`` module.
        model: Triton model name (label ``model``).
        num_exits: number of candidate ramps + 1 (the final layer), one ``exit`` label each.
        flush_interval: seconds between flushes of the accumulated counts.
    """

    def __init__(self, pb_utils: Any, model: str, num_exits: int, flush_interval: float = 0.5) -> None:
        family = pb_utils.MetricFamily
        counter, gauge = family.COUNTER, family.GAUGE
        labels = {"model": model}
        self._families = {
            "exits": family("apparate_exits_total", "Samples answered per exit (ramp id; last = final layer)", counter),
            "published": family("apparate_feedback_published_total", "Feedback records written to Redis", counter),
            "dropped": family(
                "apparate_feedback_dropped_total", "Feedback records dropped (buffer full or Redis unavailable)", counter
            ),
            "stopped": family(
                "apparate_batches_stopped_total",
                "Untraced batches stopped at the ramp where their last sample exited (feedback_share < 1)", counter
            ),
            "version": family("apparate_config_version", "Exit configuration version in use", gauge),
            "rejections": family(
                "apparate_config_rejections_total", "Exit configurations rejected as invalid or stale", counter
            ),
        }
        self._exit_metrics = [self._families["exits"].Metric(labels={**labels, "exit": str(i)}) for i in range(num_exits)]
        self._published_metric = self._families["published"].Metric(labels=labels)
        self._dropped_metric = self._families["dropped"].Metric(labels=labels)
        self._stopped_metric = self._families["stopped"].Metric(labels=labels)
        self._version_metric = self._families["version"].Metric(labels=labels)
        self._rejections_metric = self._families["rejections"].Metric(labels=labels)
        self._lock = threading.Lock()
        self._exits = np.zeros(num_exits, dtype=np.int64)
        self._published = 0
        self._dropped = 0
        self._stopped = 0
        self._stopping = threading.Event()
        self._flusher = threading.Thread(target=self._run, args=(flush_interval,), name="metrics-flush", daemon=True)
        self._flusher.start()

    def count_exits(self, counts: np.ndarray) -> None:
        with self._lock:
            self._exits += counts

    def feedback_published(self, count: int) -> None:
        with self._lock:
            self._published += count

    def feedback_dropped(self, count: int) -> None:
        with self._lock:
            self._dropped += count

    def batch_stopped(self) -> None:
        with self._lock:
            self._stopped += 1

    def config_applied(self, version: int) -> None:
        self._version_metric.set(version)

    def config_rejected(self) -> None:
        self._rejections_metric.increment(1)

    def flush(self) -> None:
        with self._lock:
            exits, self._exits = self._exits, np.zeros_like(self._exits)
            published, dropped, self._published, self._dropped = self._published, self._dropped, 0, 0
            stopped, self._stopped = self._stopped, 0
        for metric, count in zip(self._exit_metrics, exits.tolist()):
            if count:
                metric.increment(count)
        if published:
            self._published_metric.increment(published)
        if dropped:
            self._dropped_metric.increment(dropped)
        if stopped:
            self._stopped_metric.increment(stopped)

    def close(self) -> None:
        self._stopping.set()
        self._flusher.join(2.0)
        self.flush()

    def _run(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            self.flush()
