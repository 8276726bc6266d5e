"""E3 plan document: round trip, and every inconsistency with the model named by its field."""

from __future__ import annotations

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
