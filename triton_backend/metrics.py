"""Custom metrics on Triton's Prometheus endpoint (``/metrics`` on the metrics port).

``triton_python_backend_utils`` only exists inside the Triton stub, so it is passed in rather than imported here.
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
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        exits = pb_utils.MetricFamily("apparate_exits_total", "Samples answered per exit (ramp id; last = final)", counter)
        self._exits = [exits.Metric(labels={"model": model, "exit": str(i)}) for i in range(num_exits)]
        family = pb_utils.MetricFamily
        labels = {"model": model}
        self.feedback_published = family(
            "apparate_feedback_published_total", "Feedback records written to Redis", counter
        ).Metric(labels=labels)
        self.feedback_dropped = family(
            "apparate_feedback_dropped_total", "Feedback records dropped (buffer full or Redis unavailable)", counter
        ).Metric(labels=labels)
        self.config_version = family("apparate_config_version", "Exit configuration version in use", gauge).Metric(
            labels=labels
        )
        self.config_rejections = family(
            "apparate_config_rejections_total", "Exit configurations rejected as invalid or stale", counter
        ).Metric(labels=labels)

    def count_exits(self, counts: list[int]) -> None:
        for metric, count in zip(self._exits, counts):
            if count:
                metric.increment(count)
