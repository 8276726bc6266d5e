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
            "deferred": family(
                "apparate_batches_deferred_total",
                "Traced batches answered at a ramp whose deeper blocks ran off the request path", counter
            ),
            "inline": family(
                "apparate_batches_finished_inline_total",
                "Traced batches answered at a ramp whose deeper blocks ran inline (the off-path runner was full)",
                counter,
            ),
            "held": family(
                "apparate_answers_held_total",
                "Requests answered at a ramp whose response waited for the end of their batch, a full one (requests "
                "were queueing behind it)",
                counter,
            ),
            "control": family(
                "apparate_batches_control_total",
                "Traced batches served on the fused graph while exits were on (the baseline of measured savings)",
                counter,
            ),
            "version": family("apparate_config_version", "Exit configuration version in use", gauge),
            "rejections": family(
                "apparate_config_rejections_total", "Exit configurations rejected as invalid or stale", counter
            ),
            "plan": family("apparate_e3_plan_revision", "E3 plan revision whose sizing the block models serve", gauge),
            "plan_failures": family(
                "apparate_e3_plan_failures_total", "Block-model reloads for a re-sized E3 plan that Triton refused",
                counter,
            ),
        }
        self._exit_metrics = [self._families["exits"].Metric(labels={**labels, "exit": str(i)}) for i in range(num_exits)]
        #: Counters incremented on the request path, flushed to Triton's by the background thread.
        self._counters = {key: self._families[key].Metric(labels=labels)
                          for key in ("published", "dropped", "stopped", "deferred", "inline", "held", "control")}
        self._version_metric = self._families["version"].Metric(labels=labels)
        self._rejections_metric = self._families["rejections"].Metric(labels=labels)
        self._plan_metric = self._families["plan"].Metric(labels=labels)
        self._plan_failures_metric = self._families["plan_failures"].Metric(labels=labels)
        self._lock = threading.Lock()
        self._exits = np.zeros(num_exits, dtype=np.int64)
        self._counts = dict.fromkeys(self._counters, 0)
        self._stopping = threading.Event()
        self._flusher = threading.Thread(target=self._run, args=(flush_interval,), name="metrics-flush", daemon=True)
        self._flusher.start()

    def count_exits(self, counts: np.ndarray) -> None:
        with self._lock:
            self._exits += counts

    def feedback_published(self, count: int) -> None:
        self._count("published", count)

    def feedback_dropped(self, count: int) -> None:
        self._count("dropped", count)

    def batch_stopped(self) -> None:
        self._count("stopped")

    def batch_deferred(self) -> None:
        self._count("deferred")

    def batch_finished_inline(self) -> None:
        self._count("inline")

    def answers_held(self, count: int) -> None:
        self._count("held", count)

    def batch_controlled(self) -> None:
        self._count("control")

    def _count(self, key: str, count: int = 1) -> None:
        with self._lock:
            self._counts[key] += count

    def config_applied(self, version: int) -> None:
        self._version_metric.set(version)

    def config_rejected(self) -> None:
        self._rejections_metric.increment(1)

    def plan_applied(self, revision: int) -> None:
        self._plan_metric.set(revision)

    def plan_failed(self) -> None:
        self._plan_failures_metric.increment(1)

    def flush(self) -> None:
        with self._lock:
            exits, self._exits = self._exits, np.zeros_like(self._exits)
            counts, self._counts = self._counts, dict.fromkeys(self._counters, 0)
        for metric, count in zip(self._exit_metrics, exits.tolist()):
            if count:
                metric.increment(count)
        for key, count in counts.items():
            if count:
                self._counters[key].increment(count)

    def close(self) -> None:
        self._stopping.set()
        self._flusher.join(2.0)
        self.flush()

    def _run(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            self.flush()
