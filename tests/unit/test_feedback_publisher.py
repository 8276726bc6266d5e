"""Feedback publisher on a real redis-server: the manifest comes back after Redis lost it, the stream stays bounded."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import redis

from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.keys import RedisKeys
from triton_backend.feedback_publisher import FeedbackPublisher

KEYS = RedisKeys("m")


def _record() -> FeedbackRecord:
    return FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.zeros((1, 4), int), np.zeros(4, int),
                          np.full(4, 1), BatchTiming(1.0, 0.1, 0.0, np.ones(4)))


def _eventually(condition: Callable[[], bool], timeout: float, feed: Callable[[], None] = lambda: None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        feed()
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_manifest_is_registered_again_after_redis_lost_it_without_an_error(redis_url: str,
                                                                               client: redis.Redis) -> None:
    publisher = FeedbackPublisher(redis.Redis.from_url(redis_url), KEYS, '{"name": "m"}', flush_interval=0.01,
                                  register_every=0.2)
    try:
        publisher.offer(_record())
        assert _eventually(lambda: client.get(KEYS.manifest) is not None, 5)
        client.flushall()  # a restart without persistence: the publisher's connection never failed
        back = _eventually(lambda: client.get(KEYS.manifest) is not None and client.sismember(RedisKeys.models(), "m"),
                           5, feed=lambda: publisher.offer(_record()))
    finally:
        publisher.close()
    assert back, "the manifest was never registered again: the controller cannot find the model"


def test_the_feedback_stream_is_trimmed_to_about_its_maximum_length(redis_url: str, client: redis.Redis) -> None:
    published: list[int] = []
    publisher = FeedbackPublisher(redis.Redis.from_url(redis_url), KEYS, "{}", stream_maxlen=100, buffer=2000,
                                  flush_interval=0.01, on_published=published.append)
    try:
        for _ in range(1000):
            publisher.offer(_record())
        assert _eventually(lambda: sum(published) == 1000, 10)
    finally:
        publisher.close()
    assert 100 <= client.xlen(KEYS.feedback) < 300  # MAXLEN ~ trims whole stream nodes (100 entries each)


def test_the_manifest_is_registered_before_any_feedback(redis_url: str, client: redis.Redis) -> None:
    """A backend serving with every exit off publishes no feedback; the controller must still find the model (to
    probe exits again after a restart)."""
    publisher = FeedbackPublisher(redis.Redis.from_url(redis_url), KEYS, '{"name": "m"}', register_every=0.2)
    try:
        registered = _eventually(lambda: client.sismember(RedisKeys.models(), "m"), 5)
        client.flushall()
        again = _eventually(lambda: client.get(KEYS.manifest) is not None, 5)
    finally:
        publisher.close()
    assert registered and again
    assert client.xlen(KEYS.feedback) == 0
