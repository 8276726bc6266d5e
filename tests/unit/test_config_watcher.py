"""Config watcher on a real redis-server: whatever breaks inside its loop, it keeps watching, fail-static."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config_store import publish_config
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys
from tests.unit.test_exit_config import SHARED_CPU, malformed_documents
from triton_backend.config_watcher import ConfigWatcher

KEYS = RedisKeys("m")


def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _fails_once(failures: list[int]) -> Callable[..., None]:
    """A metric hook that raises the first time, like a metric update failing in the stub."""

    def hook(*_: object) -> None:
        failures.append(1)
        if len(failures) == 1:
            raise RuntimeError("metric update failed")

    return hook


def _watcher(client: redis.Redis, **hooks: Callable[..., None]) -> ConfigWatcher:
    return ConfigWatcher(client, KEYS, num_ramps=3, initial=ExitConfig("m", 0, {0: 1.0}), poll_interval=0.05,
                         **hooks)


def test_a_failing_applied_hook_does_not_end_the_watcher(client: redis.Redis) -> None:
    failures: list[int] = []
    watcher = _watcher(client, on_applied=_fails_once(failures))
    try:
        first = publish_config(client, KEYS, {0: 0.9}, writer="test")
        assert _eventually(lambda: bool(failures))
        assert watcher.current == first  # applied before the hook failed
        second = publish_config(client, KEYS, {1: 0.8}, writer="test")
        assert _eventually(lambda: watcher.current == second), "the watcher stopped after a hook failed"
    finally:
        watcher.close()


def test_a_failing_rejected_hook_keeps_the_last_good_configuration_and_watching(client: redis.Redis) -> None:
    failures: list[int] = []
    watcher = _watcher(client, on_rejected=_fails_once(failures))
    try:
        good = publish_config(client, KEYS, {0: 0.9}, writer="test")
        assert _eventually(lambda: watcher.current == good)
        publish_config(client, KEYS, {7: 0.5}, writer="test")  # names a ramp the model does not have
        assert _eventually(lambda: bool(failures))
        assert watcher.current == good
        later = publish_config(client, KEYS, {2: 0.7}, writer="test")
        assert _eventually(lambda: watcher.current == later), "the watcher stopped after a hook failed"
    finally:
        watcher.close()


@settings(SHARED_CPU, max_examples=25)
@given(st.lists(malformed_documents(), min_size=1, max_size=12))
def test_every_malformed_document_is_rejected_counted_and_logged_and_the_good_one_stays(
    redis_port: int, documents: list[str]
) -> None:
    """What a buggy writer stores or publishes (hypothesis draws it) never replaces the configuration in use."""
    with redis.Redis(port=redis_port) as client:
        client.flushall()
        rejected: list[int] = []
        watcher = _watcher(client, on_rejected=lambda: rejected.append(1))
        try:
            good = publish_config(client, KEYS, {0: 0.9}, writer="test")
            assert _eventually(lambda: watcher.current == good)
            previous = None
            for document in documents:
                with _logged_warnings() as warnings:
                    assert not watcher.offer(document.encode())
                assert watcher.current == good
                repeated = document == previous  # the same bad document read again is not a new rejection
                assert len(warnings) == (0 if repeated else 1), "a rejection was not logged once"
                previous = document
            assert len(rejected) == sum(d != p for d, p in zip(documents, [None, *documents])), "not counted"
        finally:
            watcher.close()


@contextlib.contextmanager
def _logged_warnings() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("triton_backend.config_watcher")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
