"""Keep the backend's exit configuration in step with Redis, fail-static.

A background thread subscribes to the model's notify channel (new versions arrive within milliseconds) and also polls
the config key (a missed message or a restarted Redis still converges). Each candidate is parsed, validated against
the manifest and must be newer than the one in use; only then is it swapped in by a single reference assignment,
which ``execute`` reads once per batch, so a batch never sees half a configuration. Anything invalid or unreachable
leaves the last good configuration in place, logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import redis

from early_exit.errors import ConfigError
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys

LOGGER = logging.getLogger(__name__)


class ConfigWatcher:
    """Args:
    client: Redis client.
    keys: key layout of the model.
    num_ramps: candidate ramps of the loaded model (for validation).
    initial: configuration used until Redis provides a newer valid one.
    poll_interval: seconds between polls of the config key.
    before_swap: called with each valid new configuration before it is swapped in (the backend builds the
        configuration's execution plan here, off the request path); an exception rejects the configuration.
    on_applied: called with each configuration swapped in.
    on_rejected: called once per rejected configuration.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        num_ramps: int,
        initial: ExitConfig,
        poll_interval: float = 1.0,
        before_swap: Callable[[ExitConfig], object] = lambda c: None,
        on_applied: Callable[[ExitConfig], None] = lambda c: None,
        on_rejected: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._num_ramps = num_ramps
        self._current = initial
        self._poll_interval = poll_interval
        self._before_swap = before_swap
        self._on_applied = on_applied
        self._on_rejected = on_rejected
        self._last_rejected: bytes | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"config-{keys.model}", daemon=True)
        self._thread.start()

    @property
    def current(self) -> ExitConfig:
        """The configuration in use; read it once per batch."""
        return self._current

    def close(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def offer(self, raw: bytes) -> bool:
        """Validate ``raw`` and swap it in when it is newer; returns whether it was applied."""
        with self._lock:
            try:
                config = ExitConfig.from_json(raw)
                if config.model != self._keys.model:
                    raise ConfigError(f"configuration is for model {config.model!r}, not {self._keys.model!r}")
                config.validate(self._num_ramps)
            except ConfigError as exc:
                self._reject(raw, f"invalid exit configuration: {exc}")
                return False
            if config.version == self._current.version:
                return False
            if config.version < self._current.version:
                self._reject(raw, f"stale exit configuration version {config.version} < {self._current.version}")
                return False
            try:
                self._before_swap(config)
            except Exception as exc:  # a configuration the model cannot run must not reach the request path
                self._reject(raw, f"exit configuration v{config.version} cannot be prepared: {exc!r}")
                return False
            self._current = config
        LOGGER.info("applied exit configuration v%d: %s", config.version, config.thresholds)
        self._on_applied(config)
        return True

    def _reject(self, raw: bytes, reason: str) -> None:
        if raw == self._last_rejected:  # a poll re-reading the same bad document is not a new rejection
            return
        self._last_rejected = raw
        LOGGER.warning("%s; keeping v%d", reason, self._current.version)
        self._on_rejected()

    def _poll(self) -> None:
        raw = self._client.get(self._keys.config)
        if raw is not None:
            self.offer(raw)

    def _run(self) -> None:
        backoff = self._poll_interval
        while not self._stopping.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._keys.notify)
                self._poll()  # pick up anything written before we subscribed
                backoff = self._poll_interval
                while not self._stopping.is_set():
                    # A notification only says "something changed": the stored document stays the truth, so a
                    # message and a poll timeout both end in reading the key.
                    pubsub.get_message(timeout=self._poll_interval)
                    self._poll()
            except Exception as exc:  # noqa: BLE001 - whatever broke, the watcher must outlive it (fail-static)
                LOGGER.warning("config watch failed (%r); keeping v%d, retrying in %.1fs",
                               exc, self._current.version, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

