"""Record which exit configurations were live while traffic ran (for reports and tests)."""

from __future__ import annotations

import threading
import time

import redis

from controller.config_store import read_config
from early_exit.keys import RedisKeys

ConfigTimeline = list[tuple[float, int, dict[int, float]]]


def record_configs(client: redis.Redis, model: str, worker: threading.Thread, interval: float = 0.05) -> ConfigTimeline:
    """Poll the stored configuration until ``worker`` ends; returns ``(perf_counter time, version, thresholds)``
    for every version seen, in order."""
    timeline: ConfigTimeline = []
    while worker.is_alive():
        config = read_config(client, RedisKeys(model))
        if config is not None and (not timeline or timeline[-1][1] != config.version):
            timeline.append((time.perf_counter(), config.version, config.thresholds))
        worker.join(interval)
    return timeline
