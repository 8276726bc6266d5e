"""Read and write exit configurations in Redis (controller side)."""

from __future__ import annotations

import redis

from early_exit.errors import ConfigError
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys


def read_config(client: redis.Redis, keys: RedisKeys) -> ExitConfig | None:
    """The stored configuration, or ``None`` when absent or unreadable."""
    raw = client.get(keys.config)
    if raw is None:
        return None
    try:
        return ExitConfig.from_json(raw)
    except ConfigError:
        return None


def write_config(client: redis.Redis, keys: RedisKeys, config: ExitConfig) -> None:
    """Store ``config`` and notify subscribers, in one transaction."""
    pipe = client.pipeline()
    pipe.set(keys.config, config.to_json())
    pipe.publish(keys.notify, str(config.version))
    pipe.execute()
