"""E3 deployment plan: how a ramp-augmented model is split into block models. The one owner of its JSON format.

In throughput mode (E3) the model is cut at its exits into *block groups* (blocks fused, then the ramp at the group's
end, or the final layer for the last group). The router entry ``<entry>`` (``plan.json`` in its version folder) is
the model clients call: its own batcher gathers the first group's batch and it runs the first group itself, since
every request needs it; each later group ``k`` is its own Triton model ``<entry>_b<k>`` with its own dynamic batcher
and instance count. The router stops each sample at the first exit that is confident enough, so later groups only see
survivors, and Triton's batcher merges the survivors of many upstream batches into full batches.

Values cross between groups as Triton tensors; a value's tensor name is derived from its name in the manifest by
:func:`tensor_name`, so the router and the block models agree without a table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from early_exit.errors import ArtifactError
from early_exit.manifest import Manifest, TensorSpec
from early_exit.model_config import INSTANCE_KINDS, InstanceKind, model_config, tensor_config, verdict_configs

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
#: Outputs of a block group besides its carried values: its exit's verdict on every sample.
VERDICT_OUTPUTS = ("PROBS", "CONFIDENCE", "LABEL")
BLOCK_BACKEND = "apparate_e3_block"


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
        queue_delay_us: how long its batcher may wait to fill ``batch_size`` (the first group's: the router's).
        replicas: Triton instances of the block model (the first group's: the router's workers that run it).
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
        expected: the planner's estimates (survivors per group, compute per request, capacity), for reports and for
            noticing when the exit rates the sizing assumed no longer hold.
        instance_kind: where the block models' instances run.
        threads: torch threads of each block instance on a CPU (0: torch's default).
        max_batch_size: the router's; a block model takes at least twice the plan's batch size.
        planner: the planner settings the sizing was made with (``controller.e3_planner.PlannerSettings``, tuner
            aside), so the controller can size the same groups again for other exit rates; empty when unknown.
        revision: 0 as prepared; the controller counts re-sizings up.
        origin: identifies the ``prepare.e3`` run the plan descends from (re-sizings keep it), so a router tells a
            re-sized revision of its own plan from a stale plan of an earlier deployment.
    """

    source: str
    groups: tuple[BlockGroup, ...]
    thresholds: dict[int, float]
    sample_rate: float
    slo_ms: float
    expected: dict[str, Any]
    instance_kind: InstanceKind = "KIND_CPU"
    threads: int = 0
    max_batch_size: int = 32
    planner: dict[str, Any] = field(default_factory=dict)
    revision: int = 0
    origin: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS or self.threads < 0 or self.max_batch_size < 1:
            raise ArtifactError(f"plan.instance_kind must be one of {INSTANCE_KINDS}, threads >= 0 and "
                                f"max_batch_size >= 1; got {self.instance_kind!r}, {self.threads}, "
                                f"{self.max_batch_size}")

    @property
    def exits(self) -> tuple[int, ...]:
        """Ramp ids the plan can exit at, in depth order."""
        return tuple(group.ramp for group in self.groups if group.ramp is not None)

    @property
    def sizing(self) -> tuple[tuple[tuple[int, int], ...], int]:
        """What re-sizing may change: each group's queue delay and replicas, and the instances' threads."""
        return tuple((group.queue_delay_us, group.replicas) for group in self.groups), self.threads

    def same_groups(self, other: E3Plan) -> bool:
        """Whether ``other`` deploys the same block models, sizing aside: then it can replace this plan by
        reloading block models; otherwise only a new ``prepare.e3`` can."""
        def unsized(plan: E3Plan) -> tuple[Any, ...]:
            groups = tuple(replace(group, queue_delay_us=0, replicas=0) for group in plan.groups)
            return plan.source, groups, plan.instance_kind, plan.max_batch_size

        return unsized(self) == unsized(other)

    def resized(self, queue_delays_us: list[int], replicas: list[int], threads: int,
                expected: dict[str, Any]) -> E3Plan:
        """The same groups with new queue delays, replicas and threads, one revision on (``expected`` updates the
        estimates)."""
        groups = tuple(replace(group, queue_delay_us=int(delay), replicas=int(count))
                       for group, delay, count in zip(self.groups, queue_delays_us, replicas, strict=True))
        return replace(self, groups=groups, threads=threads, expected={**self.expected, **expected},
                       revision=self.revision + 1)

    def block_models(self, router: str) -> list[str]:
        """Names of the block models of the router ``router``: one per group after the first (which it runs)."""
        return [block_model_name(router, index) for index in range(1, len(self.groups))]

    def block_model_config(self, router: str, index: int, classes: int) -> dict[str, Any]:
        """Triton configuration (JSON form) of block model ``index`` (>= 1) of the router ``router``.

        A block model gathers survivors within its queue delay, so the survivors of several upstream batches merge, up
        to the router's largest batch (or twice B, if larger). It dispatches as soon as the queue holds B, 2B, 4B, ...
        samples: without preferred sizes Triton's batcher waits for a full batch or the whole delay, which below
        saturation is every time (measured on MiniLM, two later block models with 4.4 ms delays, E3 alone, two repeats
        per load: goodput within the SLO 85.4/86.3 against 83.1/79.9 req/s at 97 req/s offered, 102.1/68.7 against
        93.1/50.1 at 135).
        """
        if not 0 < index < len(self.groups):
            raise IndexError(f"{router} has block models 1-{len(self.groups) - 1}, not {index}")
        group = self.groups[index]
        parameters = {"source": self.source, "first_block": str(group.first_block),
                      "last_block": str(group.last_block), "ramp": "" if group.ramp is None else str(group.ramp)}
        if self.instance_kind == "KIND_CPU":
            parameters["threads"] = str(self.threads)
        inputs = [replace(spec, name=tensor_name(spec.name)) for spec in group.inputs]
        outputs = [tensor_config(replace(spec, name=tensor_name(spec.name))) for spec in group.outputs]
        max_batch_size = max(self.max_batch_size, 2 * group.batch_size)
        ladder = [group.batch_size << k for k in range(max_batch_size.bit_length())
                  if group.batch_size << k <= max_batch_size]
        return model_config(block_model_name(router, index), BLOCK_BACKEND, max_batch_size, inputs,
                            [*outputs, *verdict_configs(classes, VERDICT_OUTPUTS)],
                            group.queue_delay_us, group.replicas, self.instance_kind, parameters, ladder)

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
                instance_kind=str(data.get("instance_kind", "KIND_CPU")),  # type: ignore[arg-type]  # __post_init__
                threads=int(data.get("threads", 0)),
                max_batch_size=int(data.get("max_batch_size", 32)),
                planner=dict(data.get("planner", {})),
                revision=int(data.get("revision", 0)),
                origin=str(data.get("origin", "")),
            )
        except ArtifactError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"plan field missing or malformed: {exc!r}") from exc


def _spec(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))
