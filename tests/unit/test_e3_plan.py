"""E3 plan document: round trip, and every inconsistency with the model named by its field."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from early_exit.e3_plan import BlockGroup, E3Plan, tensor_name
from early_exit.errors import ArtifactError
from early_exit.manifest import BlockSpec, Manifest, RampSpec, TensorSpec

X = TensorSpec("x", "float32", (4,))


def _manifest() -> Manifest:
    blocks = tuple(BlockSpec(f"b{i}", ("x",) if i == 0 else (f"v{i - 1}",), (f"v{i}",), "") for i in range(3))
    ramps = tuple(RampSpec(i, i, {"kind": "linear", "features": 4, "classes": 2}) for i in range(2))
    return Manifest("m", 2, (X,), blocks, ramps, "r", "")


def _plan(**overrides: object) -> E3Plan:
    groups = (BlockGroup(0, 0, 0, (X,), (TensorSpec("v0", "float32", (4,)),), 8, 1000, 1),
              BlockGroup(1, 2, None, (TensorSpec("v0", "float32", (4,)),), (), 8, 2000, 2))
    return replace(E3Plan("m", groups, {0: 0.9}, 0.05, 50.0, {"cost_ms": 1.0}), **overrides)


def test_a_plan_survives_its_json() -> None:
    plan = _plan()
    plan.validate(_manifest())
    assert E3Plan.from_json(plan.to_json()) == plan
    assert plan.exits == (0,)


@pytest.mark.parametrize(("change", "message"), [
    ({"groups": ()}, "empty"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"thresholds": {1: 0.9}}, "thresholds"),
])
def test_inconsistent_plans_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        _plan(**change).validate(_manifest())


def test_groups_must_tile_the_model_and_end_at_their_ramp() -> None:
    plan = _plan()
    gap = replace(plan, groups=(plan.groups[0], replace(plan.groups[1], first_block=2)))
    with pytest.raises(ArtifactError, match=r"groups\[1\]"):
        gap.validate(_manifest())
    wrong_ramp = replace(plan, groups=(replace(plan.groups[0], ramp=1), plan.groups[1]), thresholds={1: 0.9})
    with pytest.raises(ArtifactError, match="does not read block"):
        wrong_ramp.validate(_manifest())
    short = replace(plan, groups=(plan.groups[0], replace(plan.groups[1], last_block=1)))
    with pytest.raises(ArtifactError, match="end at block"):
        short.validate(_manifest())


def test_malformed_documents_are_refused_with_the_reason() -> None:
    with pytest.raises(ArtifactError, match="malformed"):
        E3Plan.from_json('{"schema_version": 1, "groups": "nope"}')
    with pytest.raises(ArtifactError, match="schema_version"):
        E3Plan.from_json('{"schema_version": 99}')


def test_tensor_names_are_valid_triton_names() -> None:
    assert tensor_name("layer.3:out") == "V_layer_3_out"


def test_a_plan_written_before_sizing_was_recorded_loads_with_defaults() -> None:
    data = json.loads(_plan().to_json())
    for key in ("instance_kind", "threads", "max_batch_size", "planner", "revision"):
        del data[key]
    plan = E3Plan.from_json(json.dumps(data))
    assert (plan.instance_kind, plan.threads, plan.planner, plan.revision) == ("KIND_CPU", 0, {}, 0)
    with pytest.raises(ArtifactError, match="instance_kind"):
        E3Plan.from_json(json.dumps({**data, "instance_kind": "KIND_TPU"}))


def test_a_resized_plan_keeps_its_block_models_and_only_their_sizing_changes() -> None:
    plan = _plan(threads=1)
    resized = plan.resized([0, 5000], [3, 1], 2, {"survivors": [1.0, 0.3]})
    assert resized.revision == plan.revision + 1 and resized.same_groups(plan)
    assert resized.sizing == (((0, 3), (5000, 1)), 2) and resized.expected == {"cost_ms": 1.0, "survivors": [1.0, 0.3]}
    moved = replace(plan, groups=(replace(plan.groups[0], ramp=1), plan.groups[1]))
    assert not moved.same_groups(plan)


def test_block_model_configs_carry_the_sizing_the_block_tensors_and_the_verdict() -> None:
    plan = _plan(threads=1)
    assert plan.block_models("m_e3") == ["m_e3_b1"]  # the router runs the first group itself
    with pytest.raises(IndexError, match="block models 1-1"):
        plan.block_model_config("m_e3", 0, 2)
    last = plan.block_model_config("m_e3", 1, 2)
    assert last["name"] == "m_e3_b1" and last["backend"] == "apparate_e3_block"
    # block models dispatch as soon as B, 2B, 4B ... samples wait, up to their largest batch
    assert last["dynamic_batching"] == {"preferred_batch_size": [8, 16, 32], "max_queue_delay_microseconds": 2000}
    assert last["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}] and last["max_batch_size"] == 32
    assert [t["name"] for t in last["input"]] == [tensor_name("v0")]
    assert [t["name"] for t in last["output"]] == ["PROBS", "CONFIDENCE", "LABEL"]  # the final layer passes nothing on
    assert last["parameters"]["threads"] == {"string_value": "1"} and last["parameters"]["ramp"] == {"string_value": ""}
    on_gpu = replace(plan, instance_kind="KIND_GPU").block_model_config("m_e3", 1, 2)
    assert "threads" not in on_gpu["parameters"] and on_gpu["instance_group"][0]["kind"] == "KIND_GPU"
