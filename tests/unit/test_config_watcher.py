"""Config watcher on a real redis-server: whatever breaks inside its loop, it keeps watching, fail-static."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from controller.config_store import publish_config
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys
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
