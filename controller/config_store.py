"""Read and write exit configurations in Redis: the one module every writer goes through.

Versions must only go up, and one version must always mean one document: the backends ignore anything not newer
than what they run. So "read the stored version, bump it, write the document and notify" is a single compare-and-set
(``WATCH`` the key, write in ``MULTI``/``EXEC``, start again when another writer got in between), not a read
followed by a blind write. ``WATCH`` rather than a Lua script keeps the document's format in ``ExitConfig`` alone.

A stored key is not the only evidence of the version in use: after Redis lost its data the key is gone while the
backends still run their last configuration. Writers therefore pass the highest version they know to be in use
(``floor``), and the next version is above both.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from early_exit.errors import ConfigError
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys


class VersionConflictError(ConfigError):
    """The stored configuration is at least as new as the one offered."""


def read_config(client: redis.Redis, keys: RedisKeys) -> ExitConfig | None:
    """The stored configuration, or ``None`` when absent or unreadable."""
    return _parse(client.get(keys.config))


def publish_config(client: redis.Redis, keys: RedisKeys, thresholds: dict[int, float], writer: str,
                   based_on: int | None = None, floor: int = 0) -> ExitConfig | None:
    """Store ``thresholds`` as the next version and notify subscribers; returns what was written.

    Args:
        based_on: the version the thresholds were derived from: when the stored one is newer, another writer's
            decision is in use and nothing is written (``None``). ``None`` writes above whatever is stored.
        floor: the highest version known to be in use (e.g. seen in feedback), which the new one must exceed.
    """

    def next_config(stored: ExitConfig | None) -> ExitConfig | None:
        stored_version = stored.version if stored is not None else 0
        if based_on is not None and stored_version > based_on:
            return None
        version = max(stored_version, based_on or 0, floor) + 1
        return ExitConfig(keys.model, version, dict(thresholds), writer=writer)

    return _compare_and_set(client, keys, next_config)


def write_config(client: redis.Redis, keys: RedisKeys, config: ExitConfig) -> None:
    """Store ``config`` at its own version, which must be newer than the stored one; raises ``VersionConflictError``."""

    def checked(stored: ExitConfig | None) -> ExitConfig:
        if stored is not None and stored.version >= config.version:
            raise VersionConflictError(f"{keys.model}: v{stored.version} is stored, v{config.version} is not newer")
        return config

    _compare_and_set(client, keys, checked)


def _parse(raw: bytes | None) -> ExitConfig | None:
    if raw is None:
        return None
    try:
        return ExitConfig.from_json(raw)
    except ConfigError:
        return None


def _compare_and_set(client: redis.Redis, keys: RedisKeys,
                     decide: Callable[[ExitConfig | None], ExitConfig | None]) -> ExitConfig | None:
    """Write ``decide(stored)`` (unless ``None``) and its notification only if the key did not change meanwhile.

    A lost race means another writer succeeded, so retrying until this one wins always makes progress; a dead
    connection surfaces as ``WatchError`` once and then as the ``ConnectionError`` of the next ``WATCH``.
    """
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(keys.config)
                config = decide(_parse(pipe.get(keys.config)))
                if config is None:
                    return None
                pipe.multi()
                pipe.set(keys.config, config.to_json())
                pipe.publish(keys.notify, str(config.version))
                pipe.execute()
                return config
            except redis.WatchError:
                continue
            finally:
                pipe.reset()
