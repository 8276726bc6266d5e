"""ControllerService against a real redis-server: discovery, the consumer group, configuration writing, status."""

import json
import logging
import time
from typing import Any

import pytest
import redis

from controller.config_store import publish_config, read_config
from controller.guard import AccuracyGuard
from controller.model_controller import ControllerSettings
from controller.service import GROUP, READ_CHUNK, ControllerService
from controller.tuner import TunerSettings
from early_exit.exit_rule import NEVER_EXIT
from early_exit.feedback import FeedbackRecord
from early_exit.keys import RedisKeys
from early_exit.manifest import Manifest
from tests.unit.test_model_controller import _manifest, _records


def _register(client: redis.Redis, manifest: Manifest) -> RedisKeys:
    """What a backend's feedback publisher does on connection."""
    keys = RedisKeys(manifest.name)
    client.set(keys.manifest, manifest.to_json())
    client.sadd(RedisKeys.models(), manifest.name)
    return keys


def _service(client: redis.Redis, window: int = 400, **kwargs: Any) -> ControllerService:
    settings = ControllerSettings(tuner=TunerSettings(guard=AccuracyGuard(0.01, 0.0)), window=window, min_fresh=200,
                                  adjust_every=0)
    service = ControllerService(client, settings, **kwargs)
    service.discover()
    return service


def _send(client: redis.Redis, keys: RedisKeys, records: list[FeedbackRecord]) -> None:
    for record in records:
        client.xadd(keys.feedback, record.encode())


def test_a_restarted_controller_publishes_above_the_version_the_backends_serve(client: redis.Redis) -> None:
    keys = _register(client, _manifest())  # Redis lost the config key; the backends still serve v7
    service = _service(client)
    _send(client, keys, _records(7, 400, ramp_right=True))
    service.poll(block_ms=10)
    stored = read_config(client, keys)
    assert stored is not None and stored.version > 7


def test_a_configuration_lost_with_redis_is_replaced_and_tuning_resumes(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    service = _service(client)
    _send(client, keys, _records(7, 64, ramp_right=True, ramps=(1,)))  # a v7 the controller never saw, other ramps
    service.poll(block_ms=10)
    reasserted = read_config(client, keys)
    assert reasserted is not None and reasserted.version == 8 and reasserted.thresholds == {0: NEVER_EXIT}
    _send(client, keys, _records(8, 400, ramp_right=True))  # the backends switched to it
    service.poll(block_ms=10)
    tuned = read_config(client, keys)
    assert tuned is not None and tuned.version == 9 and tuned.thresholds[0] < NEVER_EXIT


def test_feedback_is_read_again_after_redis_lost_the_consumer_group(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    service = _service(client)
    client.flushall()  # Redis restarted without persistence: no group, no stream, no manifest
    _register(client, _manifest())
    records = _records(1, 80, ramp_right=True)
    _send(client, keys, records)
    assert sum(service.poll(block_ms=10) for _ in range(2)) == len(records)


def test_a_backlog_is_read_whole_and_tuned_on_once(client: redis.Redis) -> None:
    """A controller that fell behind finds more than one read's worth of records: it drains them (up to a window's
    worth) before tuning, so it publishes one configuration, not one per chunk."""
    keys = _register(client, _manifest())
    publish_config(client, keys, {0: NEVER_EXIT}, writer="prepare")  # v1, which the backends serve
    service = _service(client, window=4 * READ_CHUNK)
    backlog = _records(1, 8 * (2 * READ_CHUNK + 40), ramp_right=True)
    _send(client, keys, backlog)
    assert service.poll(block_ms=10) == len(backlog)
    assert service.controllers["m"].rounds == 1
    tuned = read_config(client, keys)
    assert tuned is not None and tuned.version == 2


def test_the_consumer_name_survives_a_restart(client: redis.Redis) -> None:
    assert _service(client).consumer == _service(client).consumer


def test_entries_a_crashed_controller_never_acknowledged_are_claimed(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    _service(client)  # creates the group
    records = _records(1, 80, ramp_right=True)
    _send(client, keys, records)
    client.xreadgroup(GROUP, "crashed", {keys.feedback: ">"})  # read, then killed before acknowledging
    time.sleep(0.05)
    successor = _service(client, consumer="successor", claim_idle=0.05)
    assert successor.poll(block_ms=10) == len(records)
    assert len(successor.controllers["m"].window) == 80
    assert client.xpending(keys.feedback, GROUP)["pending"] == 0


def test_a_record_written_twice_by_a_retried_pipeline_is_observed_once(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    service = _service(client)
    record = _records(1, 8, ramp_right=True)[0]
    _send(client, keys, [record, record])
    service.poll(block_ms=10)
    assert len(service.controllers["m"].window) == record.batch_size


def test_the_configuration_in_use_is_written_again_after_redis_lost_it(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    service = _service(client)
    _send(client, keys, _records(1, 400, ramp_right=True))
    service.poll(block_ms=10)
    tuned = read_config(client, keys)
    assert tuned is not None
    client.flushall()  # nothing served since: no feedback says which version is in use
    service.poll(block_ms=10)
    service.poll(block_ms=10)
    restored = read_config(client, keys)
    assert restored is not None and restored.version > tuned.version and restored.thresholds == tuned.thresholds


def test_the_active_controller_reports_whose_feedback_its_window_holds(client: redis.Redis,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    keys = _register(client, _manifest())
    service = _service(client, consumer="c", lease_ttl=5.0, status_every=0.0)
    assert service.lease is not None and service.lease.acquire_or_renew()
    _send(client, keys, _records(1, 96, ramp_right=True, replica="triton-a", seed=1))
    _send(client, keys, _records(1, 64, ramp_right=True, replica="triton-b", seed=2))
    _send(client, keys, _records(1, 32, ramp_right=True, replica="", seed=3))  # an older backend
    with caplog.at_level(logging.INFO, logger="controller.service"):
        service.poll(block_ms=10)
        _send(client, keys, _records(1, 32, ramp_right=True, replica="triton-a", seed=4))
        service.poll(block_ms=10)
    status = json.loads(client.get(keys.status))
    assert status["holder"] == service.lease.holder and status["model"] == "m"
    assert status["replicas"] == {"triton-a": 128, "triton-b": 64, "": 32} and status["window"] == 224
    assert status["config_version"] == service.controllers["m"].current.version
    assert abs(status["updated_at"] - time.time()) < 60 and 0 < client.ttl(keys.status) <= 60
    first_seen = [r.getMessage() for r in caplog.records if "feedback from replica" in r.getMessage()]
    assert len(first_seen) == 3 and sum("triton-a" in m for m in first_seen) == 1  # once each, when new


def test_the_status_document_is_rewritten_at_most_every_status_every_seconds(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    service = _service(client, status_every=30.0)
    service.poll(block_ms=1)
    written = json.loads(client.get(keys.status))
    assert written["holder"] == service.consumer and written["window"] == 0 and written["replicas"] == {}
    _send(client, keys, _records(1, 16, ramp_right=True, replica="triton-a"))
    service.poll(block_ms=10)
    assert json.loads(client.get(keys.status)) == written  # not due yet: one SET per model and interval
