"""Custom metrics on Triton's Prometheus endpoint (``/metrics`` on the metrics port).

``triton_python_backend_utils`` only exists inside the Triton stub, so it is passed in rather than imported here.
A ``MetricFamily`` must outlive its metrics, so this object keeps both.
"""

from __future__ import annotations

from typing import Any


class BackendMetrics:
    """Counters and gauges of one model instance.

    Args:
        pb_utils: the ``triton_python_backend_utils`` module.
        model: Triton model name (label ``model``).
        num_exits: number of candidate ramps + 1 (the final layer), one ``exit`` label each.
    """

    def __init__(self, pb_utils: Any, model: str, num_exits: int) -> None:
        family = pb_utils.MetricFamily
        counter, gauge = family.COUNTER, family.GAUGE
        labels = {"model": model}
        self._families = {
            "exits": family("apparate_exits_total", "Samples answered per exit (ramp id; last = final layer)", counter),
            "published": family("apparate_feedback_published_total", "Feedback records written to Redis", counter),
            "dropped": family(
                "apparate_feedback_dropped_total", "Feedback records dropped (buffer full or Redis unavailable)", counter
            ),
            "version": family("apparate_config_version", "Exit configuration version in use", gauge),
            "rejections": family(
                "apparate_config_rejections_total", "Exit configurations rejected as invalid or stale", counter
            ),
        }
        self._exits = [self._families["exits"].Metric(labels={**labels, "exit": str(i)}) for i in range(num_exits)]
        self.feedback_published = self._families["published"].Metric(labels=labels)
        self.feedback_dropped = self._families["dropped"].Metric(labels=labels)
        self.config_version = self._families["version"].Metric(labels=labels)
        self.config_rejections = self._families["rejections"].Metric(labels=labels)

    def count_exits(self, counts: list[int]) -> None:
        for metric, count in zip(self._exits, counts):
            if count:
                metric.increment(count)
