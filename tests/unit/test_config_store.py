"""Config store on a real redis-server: versions only go up, writers never collide, the notify goes with the write."""

from __future__ import annotations

import threading

import pytest
import redis

from controller.config_store import VersionConflictError, publish_config, read_config, write_config
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys

KEYS = RedisKeys("m")


def test_publishing_bumps_the_stored_version(client: redis.Redis) -> None:
    first = publish_config(client, KEYS, {0: 0.9}, writer="test")
    second = publish_config(client, KEYS, {0: 0.8}, writer="test")
    assert (first.version, second.version) == (1, 2)
    assert read_config(client, KEYS) == second


def test_a_lost_key_does_not_restart_versions_below_what_is_in_use(client: redis.Redis) -> None:
    publish_config(client, KEYS, {0: 0.9}, writer="test", floor=7)
    client.flushall()  # Redis lost its data; the backends still run v8
    assert publish_config(client, KEYS, {0: 0.8}, writer="test", floor=8).version == 9


def test_a_writer_that_missed_a_newer_version_is_refused(client: redis.Redis) -> None:
    operator = publish_config(client, KEYS, {0: 0.5}, writer="operator", floor=4)
    assert publish_config(client, KEYS, {0: 0.9}, writer="controller", based_on=4) is None
    assert read_config(client, KEYS) == operator


def test_a_writer_ahead_of_a_rolled_back_store_publishes_above_what_it_knows(client: redis.Redis) -> None:
    publish_config(client, KEYS, {0: 0.5}, writer="test")
    assert publish_config(client, KEYS, {0: 0.9}, writer="controller", based_on=6).version == 7


def test_concurrent_writers_never_publish_the_same_version(redis_url: str) -> None:
    written: list[ExitConfig] = []

    def writer(name: str) -> None:
        with redis.Redis.from_url(redis_url) as connection:
            for i in range(40):
                written.append(publish_config(connection, KEYS, {0: i / 40}, writer=name))

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(config.version for config in written) == list(range(1, 161))


def test_write_config_refuses_a_version_that_is_not_newer(client: redis.Redis) -> None:
    stored = ExitConfig("m", 5, {0: 0.9})
    write_config(client, KEYS, stored)
    for version in (5, 4):
        with pytest.raises(VersionConflictError, match="v5"):
            write_config(client, KEYS, ExitConfig("m", version, {1: 0.5}))
    assert read_config(client, KEYS) == stored


def test_subscribers_are_notified_of_the_version_written(client: redis.Redis) -> None:
    subscriber = client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(KEYS.notify)
    subscriber.get_message(timeout=1.0)
    config = publish_config(client, KEYS, {0: 0.9}, writer="test")
    message = subscriber.get_message(timeout=2.0)
    subscriber.close()
    assert message is not None and message["data"] == str(config.version).encode()
