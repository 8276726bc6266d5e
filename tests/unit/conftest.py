"""A real ``redis-server`` on a free loopback port for the unit tests of the Redis-facing modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from workload.stack import free_port, start_redis


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One server per test module: starting one takes a moment, emptying it takes none."""
    port = free_port()
    process = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield port
    process.stop()


@pytest.fixture
def redis_url(redis_port: int) -> str:
    """URL of the module's server, emptied for this test."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    with redis.Redis.from_url(url) as connection:
        connection.flushall()
    return url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as connection:
        yield connection
