"""PlanFollower: an E3 router registers its plan, applies re-sized revisions of it, ignores what it cannot apply
and keeps serving as it was when Triton refuses a reload (real Redis; the reload itself is integration-tested)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import redis

from early_exit.e3_plan import BlockGroup, E3Plan
from early_exit.keys import RedisKeys
from early_exit.manifest import TensorSpec
from triton_backend.plan_follower import PlanFollower, reload_model

X, V = TensorSpec("x", "float32", (4,)), TensorSpec("v0", "float32", (4,))
KEYS = RedisKeys("m_e3")


def _prepared() -> E3Plan:
    groups = (BlockGroup(0, 0, 0, (X,), (V,), 4, 0, 2), BlockGroup(1, 1, None, (V,), (), 4, 3000, 2))
    return E3Plan("m", groups, {0: 0.9}, 0.05, 50.0, {"survivors": [1.0, 0.5]}, threads=1, origin="run-1")


class Reloads:
    """Records the reloads asked for; refuses them while ``refuse`` is set, as Triton does outside explicit mode."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.refuse = False

    def __call__(self, model: str, config: str) -> None:
        self.calls.append((model, json.loads(config)))
        if self.refuse:
            raise RuntimeError("400: load / unload is not allowed")


def _follower(client: redis.Redis, reloads: Reloads, **kwargs: object) -> PlanFollower:
    follower = PlanFollower(client, KEYS, "m_e3", _prepared(), 2, reloads, poll_interval=3600, **kwargs)
    follower.close()  # driven by hand below
    return follower


def test_the_prepared_plan_is_registered_and_a_resized_revision_reloads_only_changed_block_models(
    client: redis.Redis
) -> None:
    reloads, applied = Reloads(), []
    follower = _follower(client, reloads, on_applied=applied.append)
    follower.follow()
    assert E3Plan.from_json(client.get(KEYS.e3_plan)) == _prepared() and not reloads.calls
    resized = _prepared().resized([0, 9000], [2, 1], 1, {"survivors": [1.0, 0.2]})
    client.set(KEYS.e3_plan, resized.to_json())
    follower.follow()
    assert [model for model, _ in reloads.calls] == ["m_e3_b1"]  # block 0's configuration did not change
    config = reloads.calls[0][1]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 9000 and config["instance_group"][0]["count"] == 1
    assert follower.applied == resized and applied[-1] == 1
    follower.follow()
    assert len(reloads.calls) == 1  # nothing new


def test_the_first_group_is_resized_in_the_router_and_never_reloaded(client: redis.Redis) -> None:
    reloads, resizes = Reloads(), []
    follower = _follower(client, reloads, resize_first=lambda *sizing: resizes.append(sizing))
    follower.follow()
    client.set(KEYS.e3_plan, _prepared().resized([0, 3000], [1, 2], 1, {}).to_json())
    follower.follow()
    assert resizes == [(1, 1)] and not reloads.calls  # only the router's workers changed
    client.set(KEYS.e3_plan, follower.applied.resized([0, 3000], [1, 2], 2, {}).to_json())
    follower.follow()
    # more threads per instance: the router's workers and the block model alike
    assert resizes == [(1, 1), (1, 2)] and [model for model, _ in reloads.calls] == ["m_e3_b1"]


def test_a_replica_restarting_keeps_the_resized_revision_and_a_stale_deployment_gives_way(client: redis.Redis) -> None:
    resized = _prepared().resized([0, 9000], [2, 1], 1, {})
    client.set(KEYS.e3_plan, resized.to_json())
    reloads = Reloads()
    _follower(client, reloads).follow()
    assert E3Plan.from_json(client.get(KEYS.e3_plan)) == resized and len(reloads.calls) == 1
    client.set(KEYS.e3_plan, replace(resized, origin="run-0").to_json())
    _follower(client, Reloads()).follow()
    assert E3Plan.from_json(client.get(KEYS.e3_plan)) == _prepared()


def test_a_refused_reload_keeps_the_replica_as_it_was_and_is_retried_later(client: redis.Redis) -> None:
    reloads, failures = Reloads(), []
    follower = _follower(client, reloads, retry_after=3600, on_failed=lambda: failures.append(1))
    follower.follow()
    reloads.refuse = True
    client.set(KEYS.e3_plan, _prepared().resized([0, 9000], [2, 2], 1, {}).to_json())
    follower.follow()
    follower.follow()  # within retry_after: not tried again
    assert len(reloads.calls) == 1 and failures == [1] and follower.applied == _prepared()
    reloads.refuse = False
    follower.retry_after = 0.0
    follower.follow()
    assert follower.applied.revision == 1


def test_a_plan_of_other_block_models_is_not_applied(client: redis.Redis) -> None:
    reloads = Reloads()
    follower = _follower(client, reloads)
    moved = _prepared().resized([0, 9000], [2, 2], 1, {})
    moved = replace(moved, groups=(replace(moved.groups[0], last_block=1), moved.groups[1]))
    client.set(KEYS.e3_plan, moved.to_json())
    follower.follow()
    assert not reloads.calls and follower.applied == _prepared()


def test_an_unreachable_server_is_a_reload_error() -> None:
    with pytest.raises(RuntimeError, match="unreachable"):
        reload_model("m", "{}", server="127.0.0.1:1", timeout=2.0)
