"""Read and write exit configurations (and re-sized E3 plans) in Redis: the one module every writer goes through.

Versions must only go up, and one version must always mean one document: the backends ignore anything not newer
than what they run. So "read the stored version, bump it, write the document and notify" is a single compare-and-set
(``WATCH`` the key, write in ``MULTI``/``EXEC``, start again when another writer got in between), not a read
followed by a blind write. ``WATCH`` rather than a Lua script keeps the document's format in ``ExitConfig`` alone.

A stored key is not the only evidence of the version in use: after Redis lost its data the key is gone while the
backends still run their last configuration. Writers therefore pass the highest version they know to be in use
(``floor``), and the next version is above both.

A controller that holds the controller lease (``controller.lease``) passes it along: the same transaction then also
watches the lease and checks that it is still held under the same epoch, so a controller that lost the lease (it
stalled past the lease's time to live and a stand-by took over) can never publish, even one version, after the new
holder started. A plain compare-and-set would let it: its version would still be above the stored one.

A re-sized E3 plan (``early_exit.e3_plan``) is written the same way, its revision in place of the version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis

from controller.lease import Lease
from early_exit.e3_plan import E3Plan
from early_exit.errors import ArtifactError, ConfigError
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys


class VersionConflictError(ConfigError):
    """The stored configuration is at least as new as the one offered."""


def read_config(client: redis.Redis, keys: RedisKeys) -> ExitConfig | None:
    """The stored configuration, or ``None`` when absent or unreadable."""
    return _parse(client.get(keys.config))


def publish_config(client: redis.Redis, keys: RedisKeys, thresholds: dict[int, float], writer: str,
                   based_on: int | None = None, floor: int = 0, lease: Lease | None = None) -> ExitConfig | None:
    """Store ``thresholds`` as the next version and notify subscribers; returns what was written.

    Args:
        based_on: the version the thresholds were derived from: when the stored one is newer, another writer's
            decision is in use and nothing is written (``None``). ``None`` writes above whatever is stored.
        floor: the highest version known to be in use (e.g. seen in feedback), which the new one must exceed.
        lease: the controller lease the writer acts under: nothing is written unless Redis says it is still held
            (``LeaseLostError`` otherwise). ``None`` for writers outside the controller (operators, tools).
    """

    def next_config(stored: ExitConfig | None) -> ExitConfig | None:
        stored_version = stored.version if stored is not None else 0
        if based_on is not None and stored_version > based_on:
            return None
        version = max(stored_version, based_on or 0, floor) + 1
        return ExitConfig(keys.model, version, dict(thresholds), writer=writer)

    return _compare_and_set(client, keys.config, lambda raw: next_config(_parse(raw)),
                            lambda pipe, config: _write_config(pipe, keys, config), lease)


def write_config(client: redis.Redis, keys: RedisKeys, config: ExitConfig) -> None:
    """Store ``config`` at its own version, which must be newer than the stored one; raises ``VersionConflictError``."""

    def checked(stored: ExitConfig | None) -> ExitConfig:
        if stored is not None and stored.version >= config.version:
            raise VersionConflictError(f"{keys.model}: v{stored.version} is stored, v{config.version} is not newer")
        return config

    _compare_and_set(client, keys.config, lambda raw: checked(_parse(raw)),
                     lambda pipe, stored: _write_config(pipe, keys, stored))


def read_plan(client: redis.Redis, keys: RedisKeys) -> E3Plan | None:
    """The E3 plan in force for ``keys.model``, or ``None`` when absent (not an E3 entry, or none registered yet).
    Raises ``ArtifactError`` when the stored document is malformed."""
    raw = client.get(keys.e3_plan)
    return None if raw is None else E3Plan.from_json(raw)


def publish_plan(client: redis.Redis, keys: RedisKeys, plan: E3Plan, lease: Lease | None = None) -> bool:
    """Store ``plan`` unless the stored plan is already at its revision or beyond (another writer re-sized it
    meanwhile); returns whether it was written. ``lease`` as for ``publish_config``."""

    def newer(raw: bytes | None) -> E3Plan | None:
        try:
            stored = None if raw is None else E3Plan.from_json(raw)
        except ArtifactError:
            stored = None  # a malformed document is replaced
        return plan if stored is None or stored.revision < plan.revision else None

    return _compare_and_set(client, keys.e3_plan, newer, lambda pipe, value: pipe.set(keys.e3_plan, value.to_json()),
                            lease) is not None


def _parse(raw: bytes | None) -> ExitConfig | None:
    if raw is None:
        return None
    try:
        return ExitConfig.from_json(raw)
    except ConfigError:
        return None


def _write_config(pipe: redis.client.Pipeline, keys: RedisKeys, config: ExitConfig) -> None:
    pipe.set(keys.config, config.to_json())
    pipe.publish(keys.notify, str(config.version))


Value = TypeVar("Value")


def _compare_and_set(client: redis.Redis, key: str, decide: Callable[[bytes | None], Value | None],
                     write: Callable[[redis.client.Pipeline, Value], object],
                     lease: Lease | None = None) -> Value | None:
    """Write ``decide(stored)`` (unless ``None``) with ``write`` only if ``key`` (and ``lease``, when given) did not
    change meanwhile and, with a lease, only while it is ours.

    A lost race means another writer succeeded (or the lease was renewed), so retrying until this one wins
    always makes progress; a dead connection surfaces as ``WatchError`` once and then as the ``ConnectionError`` of
    the next ``WATCH``.
    """
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key, *(lease.keys if lease is not None else ()))
                if lease is not None:
                    lease.verify(pipe)
                value = decide(pipe.get(key))
                if value is None:
                    return None
                pipe.multi()
                write(pipe, value)
                pipe.execute()
                return value
            except redis.WatchError:
                continue
            finally:
                pipe.reset()
