"""E3 deployment plan: how a ramp-augmented model is split into block models. The one owner of its JSON format.

In throughput mode (E3) the model is cut at its exits into *block groups*; each group is its own Triton model
(``<entry>_b<k>``: its blocks fused, then the ramp at its end, or the final layer for the last group) with its own
dynamic batcher and instance count. The router entry ``<entry>`` (``plan.json`` in its version folder) sends each
request through the groups and stops at the first exit that is confident enough, so later groups only see survivors
and Triton's batcher merges the survivors of many upstream batches into full batches.

Values cross between groups as Triton tensors; a value's tensor name is derived from its name in the manifest by
:func:`tensor_name`, so the router and the block models agree without a table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from early_exit.errors import ArtifactError
from early_exit.manifest import Manifest, TensorSpec

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
#: Outputs of a block group besides its carried values: its exit's verdict on every sample.
VERDICT_OUTPUTS = ("PROBS", "CONFIDENCE", "LABEL")


def tensor_name(value: str) -> str:
    """Triton tensor name of a value the blocks pass on (manifest value names are graph node names)."""
    return "V_" + re.sub(r"[^A-Za-z0-9_]", "_", value)


def block_model_name(entry: str, index: int) -> str:
    return f"{entry}_b{index}"


@dataclass(frozen=True)
class BlockGroup:
    """Consecutive blocks served as one Triton model, ending at an exit.

    Args:
        first_block: index of its first block in the manifest.
        last_block: index of its last block.
        ramp: the candidate ramp at its end, or ``None`` for the group ending at the final layer.
        inputs: values it consumes (model inputs or earlier groups' outputs, ramp side inputs included), per-sample
            shape and dtype.
        outputs: values it passes on (the first is its primary output).
        batch_size: preferred batch size of its dynamic batcher (the plan's B).
        queue_delay_us: how long its batcher may wait to fill ``batch_size``.
        replicas: Triton instances of the block model.
    """

    first_block: int
    last_block: int
    ramp: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_size: int
    queue_delay_us: int
    replicas: int


@dataclass(frozen=True)
class E3Plan:
    """The block groups of one E3 entry and what the planner expected of them.

    Args:
        source: the Apparate entry (same repository) whose version folder holds the blocks, ramps and manifest.
        groups: block groups in depth order; the last ends at the final layer.
        thresholds: initial exit threshold of each group's ramp (ramp id -> threshold).
        sample_rate: share of samples that run to the final layer after exiting, so feedback stays label-free and
            unbiased (see ``triton_backend.e3_router``).
        slo_ms: the latency objective the plan was made for.
        expected: the planner's estimates (survivors per group, compute per request, capacity), for reports.
    """

    source: str
    groups: tuple[BlockGroup, ...]
    thresholds: dict[int, float]
    sample_rate: float
    slo_ms: float
    expected: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    @property
    def exits(self) -> tuple[int, ...]:
        """Ramp ids the plan can exit at, in depth order."""
        return tuple(group.ramp for group in self.groups if group.ramp is not None)

    def validate(self, manifest: Manifest) -> None:
        """Cross-checks against the source manifest; raises ``ArtifactError`` naming the field."""
        if not self.groups:
            raise ArtifactError("plan.groups is empty")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ArtifactError(f"plan.sample_rate {self.sample_rate} is not in [0, 1]")
        expected_first = 0
        for index, group in enumerate(self.groups):
            last = index == len(self.groups) - 1
            if group.first_block != expected_first or group.last_block < group.first_block:
                raise ArtifactError(f"plan.groups[{index}] does not continue where the previous group ended")
            if last != (group.ramp is None):
                raise ArtifactError(f"plan.groups[{index}]: only the last group ends without a ramp")
            if group.ramp is not None and (
                not 0 <= group.ramp < len(manifest.ramps) or manifest.ramps[group.ramp].after_block != group.last_block
            ):
                raise ArtifactError(f"plan.groups[{index}].ramp {group.ramp} does not read block {group.last_block}")
            if group.batch_size < 1 or group.replicas < 1 or group.queue_delay_us < 0:
                raise ArtifactError(f"plan.groups[{index}] needs batch_size >= 1, replicas >= 1, queue_delay_us >= 0")
            expected_first = group.last_block + 1
        if expected_first != len(manifest.blocks):
            raise ArtifactError(f"plan.groups end at block {expected_first - 1}, the model at {len(manifest.blocks) - 1}")
        if set(self.thresholds) != set(self.exits):
            raise ArtifactError(f"plan.thresholds names ramps {sorted(self.thresholds)}, the exits are {self.exits}")

    def to_json(self) -> str:
        data = asdict(self)
        data["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> E3Plan:
        """Parse; raises ``ArtifactError`` when malformed (``validate`` checks it against the model)."""
        try:
            data = json.loads(text)
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ArtifactError(f"plan schema_version {data.get('schema_version')!r} is not supported")
            return cls(
                source=str(data["source"]),
                groups=tuple(
                    BlockGroup(
                        first_block=int(g["first_block"]),
                        last_block=int(g["last_block"]),
                        ramp=None if g["ramp"] is None else int(g["ramp"]),
                        inputs=tuple(_spec(t) for t in g["inputs"]),
                        outputs=tuple(_spec(t) for t in g["outputs"]),
                        batch_size=int(g["batch_size"]),
                        queue_delay_us=int(g["queue_delay_us"]),
                        replicas=int(g["replicas"]),
                    )
                    for g in data["groups"]
                ),
                thresholds={int(k): float(v) for k, v in data["thresholds"].items()},
                sample_rate=float(data["sample_rate"]),
                slo_ms=float(data["slo_ms"]),
                expected=dict(data.get("expected", {})),
            )
        except ArtifactError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"plan field missing or malformed: {exc!r}") from exc


def _spec(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))
