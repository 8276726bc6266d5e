"""The controller lease on a real redis-server: one holder at a time, renewal, expiry, take-over, release, and fencing
(a holder that lost the lease can publish nothing); then the service acting only while it holds it."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from controller.config_store import _compare_and_set, publish_config, read_config
from controller.lease import Lease, LeaseLostError
from controller.service import GROUP, ControllerService
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys
from tests.unit.test_model_controller import _manifest, _records
from tests.unit.test_service import _register, _send, _service

KEY = RedisKeys.controller_lease()
KEYS = RedisKeys("m")


def _lease(client: redis.Redis, holder: str, ttl_s: float = 5.0) -> Lease:
    return Lease(client, KEY, holder, ttl_s)


def _lapse(lease: Lease) -> None:
    time.sleep(lease.ttl_s + 0.05)


def test_the_lease_keys_are_apart_from_every_model_key() -> None:
    for prefix in ("apparate", "prod:apparate"):
        lease = RedisKeys.controller_lease(prefix)
        model_keys = {key for name in ("controller", "controller:lease", "lease", "controller:lease:epoch")
                      for k in [RedisKeys(name, prefix)] for key in (k.feedback, k.config, k.notify, k.manifest)}
        assert not {lease, f"{lease}:epoch"} & (model_keys | {RedisKeys.models(prefix)})


def test_one_holder_at_a_time_and_renewal_extends_the_lease(client: redis.Redis) -> None:
    a, b = _lease(client, "a", ttl_s=0.4), _lease(client, "b", ttl_s=0.4)
    assert a.acquire_or_renew() and a.held and a.epoch == 1
    assert not b.acquire_or_renew() and not b.held and b.epoch is None
    for _ in range(6):  # 0.6 s in all, longer than the lease lasts: renewing keeps it
        time.sleep(0.1)
        assert a.acquire_or_renew() and a.epoch == 1
        assert not b.acquire_or_renew()
    assert client.get(KEY) == b"a" and 0 < client.pttl(KEY) <= 400


def test_a_lease_that_is_not_renewed_lapses_and_is_taken_over_under_a_new_epoch(client: redis.Redis) -> None:
    a, b = _lease(client, "a", ttl_s=0.2), _lease(client, "b", ttl_s=0.2)
    assert a.acquire_or_renew()
    _lapse(a)
    assert not a.held  # its own clock says so too, before asking Redis
    assert b.acquire_or_renew() and b.epoch == 2
    assert not a.acquire_or_renew() and a.epoch is None


def test_a_holder_that_lapsed_and_took_the_lease_again_sees_a_new_epoch(client: redis.Redis) -> None:
    a = _lease(client, "a", ttl_s=0.2)
    assert a.acquire_or_renew() and a.epoch == 1
    _lapse(a)  # somebody may have held it meanwhile: the epoch tells its holder to start over
    assert a.acquire_or_renew() and a.epoch == 2


def test_release_frees_the_lease_at_once_but_only_the_holders_own(client: redis.Redis) -> None:
    a, b = _lease(client, "a"), _lease(client, "b")
    assert a.acquire_or_renew()
    b.release()  # not b's to release
    assert client.get(KEY) == b"a" and not b.acquire_or_renew()
    a.release()
    assert not a.held and b.acquire_or_renew() and b.epoch == 2


def test_a_stale_holder_releasing_does_not_free_its_successors_lease(client: redis.Redis) -> None:
    a, b = _lease(client, "a", ttl_s=0.2), _lease(client, "b")
    assert a.acquire_or_renew()
    _lapse(a)
    assert b.acquire_or_renew()
    a.release()
    assert client.get(KEY) == b"b"


def test_a_holder_that_lost_the_lease_cannot_publish(client: redis.Redis) -> None:
    a, b = _lease(client, "a", ttl_s=0.2), _lease(client, "b")
    assert a.acquire_or_renew()
    first = publish_config(client, KEYS, {0: 0.9}, writer="a", lease=a)
    assert first is not None and first.version == 1
    _lapse(a)  # a stalls; b takes over and publishes
    assert b.acquire_or_renew()
    second = publish_config(client, KEYS, {0: 0.8}, writer="b", lease=b)
    assert second is not None and second.version == 2
    with pytest.raises(LeaseLostError):  # a wakes up, still believing it is active: Redis refuses it
        publish_config(client, KEYS, {0: 0.5}, writer="a", lease=a)
    assert read_config(client, KEYS) == second and not a.held


def test_the_epoch_fences_a_stale_process_that_reused_the_holders_name(client: redis.Redis) -> None:
    stale, b = _lease(client, "a", ttl_s=0.2), _lease(client, "b")
    assert stale.acquire_or_renew() and stale.epoch == 1
    _lapse(stale)
    assert b.acquire_or_renew()
    b.release()
    successor = _lease(client, "a")  # same holder name, e.g. a restarted process
    assert successor.acquire_or_renew() and successor.epoch == 3
    with pytest.raises(LeaseLostError):
        publish_config(client, KEYS, {0: 0.5}, writer="a", lease=stale)
    assert read_config(client, KEYS) is None
    assert publish_config(client, KEYS, {0: 0.5}, writer="a", lease=successor) is not None


def _set_config(pipe: redis.client.Pipeline, config: ExitConfig) -> None:
    pipe.set(KEYS.config, config.to_json())


def test_a_take_over_after_the_check_but_before_the_write_aborts_the_write(redis_url: str,
                                                                           client: redis.Redis) -> None:
    a = _lease(client, "a")
    assert a.acquire_or_renew()
    attempts = []

    def decide(stored: bytes | None) -> ExitConfig:
        attempts.append(stored)
        if len(attempts) == 1:  # between the transaction's lease check and its EXEC, b takes the lease over
            with redis.Redis.from_url(redis_url) as other:
                other.delete(KEY)
                assert _lease(other, "b").acquire_or_renew()
        return ExitConfig("m", 1, {0: 0.9})

    with pytest.raises(LeaseLostError):
        _compare_and_set(client, KEYS.config, decide, _set_config, lease=a)
    assert len(attempts) == 1 and read_config(client, KEYS) is None


def test_a_write_while_the_holder_is_unchanged_goes_through_a_renewal_in_between(client: redis.Redis) -> None:
    a = _lease(client, "a")
    assert a.acquire_or_renew()
    attempts = 0

    def decide(stored: bytes | None) -> ExitConfig:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            assert a.acquire_or_renew()  # touches the watched lease: this attempt aborts, the next one writes
        return ExitConfig("m", 1, {0: 0.9})

    assert _compare_and_set(client, KEYS.config, decide, _set_config, lease=a) is not None and attempts == 2


# The service: only the holder reads, tunes and publishes; a stand-by takes over and claims what the dead one read.

def _leased(client: redis.Redis, consumer: str, ttl_s: float, **kwargs: Any) -> ControllerService:
    return _service(client, consumer=consumer, lease_ttl=ttl_s, **kwargs)


def test_only_the_lease_holder_reads_feedback_and_publishes(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    active, standby = _leased(client, "a", 5.0), _leased(client, "b", 5.0)
    assert active._lead() and not standby._lead()
    assert not standby.controllers  # a stand-by keeps no models: it starts from Redis when it takes over
    _send(client, keys, _records(1, 400, ramp_right=True))
    assert active.poll(block_ms=10) == 50
    tuned = read_config(client, keys)
    assert tuned is not None and tuned.writer.startswith("controller") and standby.poll(block_ms=10) == 0
    consumers = {c["name"] for c in client.xinfo_consumers(keys.feedback, GROUP)}
    assert consumers == {b"a"}


def test_a_stand_by_takes_over_and_claims_what_the_dead_holder_read_at_once(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    dead = _leased(client, "a", 0.3)
    assert dead._lead()
    records = _records(1, 80, ramp_right=True)
    _send(client, keys, records)
    client.xreadgroup(GROUP, "a", {keys.feedback: ">"})  # the holder read them, then was killed mid-round
    _lapse(dead.lease)
    successor = _leased(client, "b", 0.3, claim_idle=30.0)  # claim_idle alone would wait 30 s
    assert successor._lead()
    assert len(successor.controllers["m"].window) == 80
    assert client.xpending(keys.feedback, GROUP)["pending"] == 0


def test_a_holder_that_lost_the_lease_publishes_nothing_and_stands_by(client: redis.Redis) -> None:
    keys = _register(client, _manifest())
    first, second = _leased(client, "a", 5.0), _leased(client, "b", 5.0)
    assert first._lead()
    client.delete(KEY)  # first is cut off long enough for its lease to go (here: deleted) and second takes it
    assert second._lead()
    _send(client, keys, _records(1, 400, ramp_right=True))
    with pytest.raises(LeaseLostError):  # it reads and tunes, but the write is fenced
        first.poll(block_ms=10)
    assert read_config(client, keys) is None
    assert not first._lead() and not first.controllers


def test_a_controller_that_stops_releases_the_lease_for_its_stand_by(client: redis.Redis) -> None:
    _register(client, _manifest())
    active, standby = _leased(client, "a", 30.0), _leased(client, "b", 30.0)
    active.run(stop_after=0.3)
    assert standby._lead() and standby.lease is not None and standby.lease.epoch == 2
