"""Key layout: model names (and prefixes) containing ':' keep their own keys, end to end on a real redis-server."""

from __future__ import annotations

import itertools
from dataclasses import replace

import redis

from controller.config_store import read_config
from early_exit.exit_rule import NEVER_EXIT
from early_exit.keys import RedisKeys
from tests.unit.test_model_controller import _manifest, _records
from tests.unit.test_service import _send, _service

NAMES = ["m", "m:config", "m:feedback", "team:m", "team", "a:b:c", "models", "m:config:notify"]


def _all_keys(prefix: str) -> list[str]:
    per_model = [[k.feedback, k.config, k.notify, k.manifest] for k in (RedisKeys(n, prefix) for n in NAMES)]
    return [*itertools.chain.from_iterable(per_model), RedisKeys.models(prefix)]


def test_no_two_models_or_key_kinds_share_a_key() -> None:
    for prefix in ("apparate", "prod:apparate"):
        keys = _all_keys(prefix)
        assert len(set(keys)) == len(keys)


def test_models_with_colons_in_their_names_are_controlled_each_on_its_own_keys(client: redis.Redis) -> None:
    prefix = "prod:apparate"
    names = ["team:m", "team", "team:m:feedback"]
    for name in names:
        keys = RedisKeys(name, prefix)
        client.set(keys.manifest, replace(_manifest(), name=name).to_json())
        client.sadd(RedisKeys.models(prefix), name)
    service = _service(client, prefix=prefix)
    assert sorted(service.controllers) == sorted(names)
    _send(client, RedisKeys("team:m", prefix), _records(1, 400, ramp_right=True))
    service.poll(block_ms=10)
    assert len(service.controllers["team:m"].window) == 400
    assert all(len(service.controllers[name].window) == 0 for name in names if name != "team:m")
    tuned = read_config(client, RedisKeys("team:m", prefix))
    assert tuned is not None and tuned.model == "team:m" and tuned.thresholds[0] < NEVER_EXIT
    assert all(read_config(client, RedisKeys(name, prefix)) is None for name in names if name != "team:m")
