"""E3 planner: which exits split the model into block models, at which batch size, with how many replicas.

Its cost model is throughput mode's own: what a request *costs in compute*, not how long it waits. A sample that
reaches block group ``k`` pays that group's per-sample compute at the batch its batcher gets (its blocks plus its
ramp, from the profile, divided by the batch) plus, for every group after the first (the router runs the first
itself), one router-to-block hop; exited samples pay nothing further, except the traced share that runs on to feed
the controller. Capacity is the compute the instances have divided by that cost.
A plan must also answer within the latency objective: a sample that runs every group waits, per group, for its compute,
for one hop (but the first), and where a group's batcher has a queue delay (later groups on dedicated devices) for its
batch to fill (survivors arrive slower deeper in the model). Compute is slower when an instance gets fewer threads
than the profile had (measured in ``make bench-e3``: a four-group MiniLM plan whose latency ignored threads and delays
served its p99 beyond the SLO even at a quarter of its capacity).

Thresholds are tuned for each candidate exit set on half the validation split with the controller's own tuner and
guard, with the per-exit compute as its objective, and must pass the guard on the other half, as the controller's
choices must on its window: so the plan's exits are ones the controller can keep within the budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from controller.tuner import TunerSettings, evaluate, is_held_out, tune_held_out
from early_exit.exit_rule import NEVER_EXIT
from early_exit.manifest import Manifest


@dataclass(frozen=True)
class PlannerSettings:
    """Args:
    slo_ms: latency objective of a request that runs every block group.
    instances: model instances the plan may spread over the groups (CPU cores, or GPUs).
    shared_cores: the instances are CPU cores, which the operating system shares among every process: each group
        then gets one single-threaded instance per core instead of its proportional share. A Python-stub instance
        sits idle while its batch's tensors travel to and from the router and while its batcher fills; with one
        instance per group, a core idles whenever the group it would serve waits (measured on MiniLM, four groups
        on two cores: 1.2x the original model's saturated capacity with one instance per group, 1.5x with two, at
        the same compute per request). Extra instances cost memory, not compute. GPUs are not shared this way: each
        device serves the groups it is assigned, in proportion to their compute.
    max_exits: most exits (block boundaries) a plan may have.
    hop_ms: compute one router-to-block call costs per sample (serialising, shared-memory copies), in the unit of
        the profile's block times (in-process milliseconds with ``profile_threads`` threads); ``make bench-e3``
        measures it in CPU time and converts it. Every group after the first pays it.
    hop_latency_ms: time one hop adds to a request beyond compute (inter-process messages, scheduling).
    queueing_share: share of the SLO that the batchers of all groups together may spend waiting to fill batches.
    profile_threads: threads per process when the profile was taken (``prepare`` profiles with torch's default, one
        per core); a block instance given fewer threads computes proportionally slower (the conservative bound).
    load: share of the plan's capacity it is sized for (queue delays are set for survivors arriving at this load).
    sample_rate: share of samples traced to the final layer for feedback.
    tuner: threshold tuning settings (accuracy budget and guard).
    """

    slo_ms: float
    instances: int = 2
    shared_cores: bool = False
    max_exits: int = 3
    hop_ms: float = 0.5
    hop_latency_ms: float = 2.0
    queueing_share: float = 0.25
    profile_threads: int = 2
    load: float = 0.8
    sample_rate: float = 0.05
    tuner: TunerSettings = TunerSettings()

    def __post_init__(self) -> None:
        if self.slo_ms <= 0 or self.instances < 1 or self.max_exits < 0 or self.hop_ms < 0:
            raise ValueError("slo_ms > 0, instances >= 1, max_exits >= 0 and hop_ms >= 0 are required")
        if not 0 < self.load <= 1 or not 0 <= self.sample_rate <= 1:
            raise ValueError(f"load must be in (0, 1] and sample_rate in [0, 1], got {self.load}, {self.sample_rate}")

    def sizing_fields(self) -> dict[str, Any]:
        """What re-sizing a deployed plan needs (every field but the tuner's), JSON-ready: the plan carries it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tuner"}

    @classmethod
    def from_sizing_fields(cls, data: Mapping[str, Any]) -> PlannerSettings:
        """Inverse of ``sizing_fields``; raises ``ValueError`` naming what is missing or malformed."""
        if "tuner" in data:
            raise ValueError("planner settings: the tuner is not part of a plan")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"planner settings: {exc}") from exc


@dataclass(frozen=True)
class GroupPlan:
    """One block group of a chosen plan."""

    first_block: int
    last_block: int
    ramp: int | None
    survivors: float  # share of requests that reach it (traced samples included)
    compute_ms: float  # one batch of the size this group is expected to get (at most the plan's batch size)
    queue_delay_us: int
    replicas: int


@dataclass(frozen=True)
class Plan:
    """The chosen exits, thresholds and sizing, with the model's estimates."""

    groups: tuple[GroupPlan, ...]
    thresholds: dict[int, float]
    batch_size: int
    cost_ms: float  # compute per request, all instances together
    vanilla_cost_ms: float  # the same for the original model at the same batch size
    latency_ms: float  # a full-depth sample: compute and queueing at every group
    agreement: float  # with the original model on the held-out half of the validation split
    threads: int  # torch threads of each block instance on a CPU

    @property
    def capacity_gain(self) -> float:
        """Modelled requests per second against the original model's on the same instances."""
        return self.vanilla_cost_ms / self.cost_ms


@dataclass(frozen=True)
class Sizing:
    """How the groups of one exit set are deployed for given exit rates, and what the model expects of it."""

    groups: tuple[GroupPlan, ...]
    cost_ms: float  # compute per request, all instances together
    latency_ms: float  # a full-depth sample
    threads: int  # torch threads of each block instance on a CPU


def _group_bounds(manifest: Manifest, exits: tuple[int, ...]) -> list[tuple[int, int, int | None]]:
    ends = [manifest.ramps[r].after_block for r in exits] + [len(manifest.blocks) - 1]
    starts = [0] + [end + 1 for end in ends[:-1]]
    return list(zip(starts, ends, [*exits, None]))


def make_plan(manifest: Manifest, confidence: np.ndarray, prediction: np.ndarray, final: np.ndarray,
              settings: PlannerSettings, exits: tuple[int, ...] | None = None) -> Plan:
    """The cheapest plan per request that meets the latency objective.

    Args:
        manifest: the source entry's manifest (its profile gives every block's and ramp's latency per batch size).
        confidence: ``[ramps, N]`` every candidate ramp's confidence on the validation split.
        prediction: ``[ramps, N]`` their predictions.
        final: ``[N]`` the original model's predictions.
        exits: consider only this exit set (ramp ids in depth order); every set of up to ``max_exits`` when
            ``None``.

    Raises:
        ValueError: when the manifest has no profile or no plan meets the objective.
    """
    if manifest.profile is None:
        raise ValueError(f"manifest of {manifest.name} has no latency profile")
    if exits is not None and any(not 0 <= r < len(manifest.ramps) for r in exits):
        raise ValueError(f"exits {exits} name ramps {manifest.name} does not have")
    candidates = [tuple(sorted(exits))] if exits is not None else [
        subset for count in range(min(settings.max_exits, len(manifest.ramps)) + 1)
        for subset in itertools.combinations(range(len(manifest.ramps)), count)
    ]
    # The original model under the same batching rules (its own batcher at the same load): one group, no hop.
    vanilla = {size: _Batching.settle(manifest, _group_bounds(manifest, ()), np.ones(1), int(size), settings).cost_ms
               for size in manifest.profile.batch_sizes}
    best: Plan | None = None
    for subset in candidates:
        for batch_size in manifest.profile.batch_sizes:
            plan = _evaluate(manifest, subset, int(batch_size), confidence, prediction, final, settings,
                             vanilla[batch_size])
            if plan is not None and (best is None or plan.cost_ms < best.cost_ms - 1e-9):
                best = plan
    if best is None:
        raise ValueError(f"no plan of {manifest.name} answers within {settings.slo_ms} ms, even without exits")
    return best


def _group_compute(manifest: Manifest, bounds: list[tuple[int, int, int | None]],
                   batch_sizes: float | np.ndarray) -> np.ndarray:
    """Profiled time of one batch through each group (its blocks, then its ramp), at one batch size for all groups
    or one per group."""
    assert manifest.profile is not None
    sizes = np.broadcast_to(np.asarray(batch_sizes, dtype=float), (len(bounds),))
    compute = []
    for (first, last, ramp), size in zip(bounds, sizes):
        block_ms, ramp_ms = manifest.profile.at(float(size))
        compute.append(block_ms[first : last + 1].sum() + (ramp_ms[ramp] if ramp is not None else 0.0))
    return np.asarray(compute)


def _evaluate(manifest: Manifest, exits: tuple[int, ...], batch_size: int, confidence: np.ndarray,
              prediction: np.ndarray, final: np.ndarray, settings: PlannerSettings,
              vanilla_cost_ms: float) -> Plan | None:
    assert manifest.profile is not None
    bounds = _group_bounds(manifest, exits)
    per_sample = _group_compute(manifest, bounds, batch_size) / batch_size + _hops(len(bounds), settings.hop_ms)
    exit_cost = np.cumsum(per_sample)  # compute spent on a sample answered at each exit, then at the final layer
    rows = list(exits)
    held_out = is_held_out(np.arange(len(final)))
    thresholds = tune_held_out(settings.tuner, confidence[rows], prediction[rows], final, exit_cost, held_out)
    if thresholds is None:
        thresholds = np.full(len(rows), NEVER_EXIT)
    correct = prediction[rows] == final[None, :]
    evaluation = evaluate(thresholds, confidence[rows], correct, exit_cost)
    agreement = evaluate(thresholds, confidence[rows][:, held_out], correct[:, held_out], exit_cost).accuracy
    undecided = 1.0 - np.concatenate([[0.0], np.cumsum(evaluation.exit_rates)[:-1]])
    sizing = resize(manifest, exits, batch_size, undecided, settings)
    if sizing is None:
        return None
    return Plan(sizing.groups, {r: float(t) for r, t in zip(exits, thresholds)}, batch_size, sizing.cost_ms,
                vanilla_cost_ms, sizing.latency_ms, agreement, sizing.threads)


def _hops(groups: int, hop_ms: float) -> np.ndarray:
    """Hop cost per sample reaching each group: the router runs the first group itself, the others are calls."""
    return np.where(np.arange(groups) > 0, hop_ms, 0.0)


_SETTLE_ROUNDS = 30  # a work-conserving batch converges geometrically, by the group's utilisation per round


@dataclass(frozen=True)
class _Batching:
    """What each group's batcher gives it at the load a plan is sized for: queue delays, batch sizes, the compute of
    one such batch, and the cost per request that follows."""

    delays: np.ndarray
    batches: np.ndarray
    compute: np.ndarray
    cost_ms: float

    @classmethod
    def settle(cls, manifest: Manifest, bounds: list[tuple[int, int, int | None]], reached: np.ndarray,
               batch_size: int, settings: PlannerSettings) -> _Batching:
        """A group's batch forms in one of two ways.

        Work-conserving, no queue delay: the router's first group (its merging workers take every waiting batch
        when one frees up) and, on shared CPU cores, every group (Triton's batcher with no delay sends what queued
        while the instances were busy). A batch holds what arrived while the group computed the one before, its
        replicas together getting its share of the instances. A delay would only make an idle core wait: measured
        on ResNet-56 at light load, the planned 4.1 ms delays of router and block model made E3's median 19.9 ms
        against the original model's 15.3; with none, 16.1 against 15.9.
        Filled within a delay (later groups on dedicated devices, where a larger batch costs little more): the
        batcher waits up to the time B samples take to arrive, within the group's share of the SLO.

        Deep groups that few samples reach get smaller batches, whose calls cost more per sample (measured on
        MiniLM: batches of 1.3-1.7 for B = 4). The cost sets the arrival rates, which set each group's batch, which
        sets the cost: a few rounds settle it."""
        conserving = np.full(len(bounds), settings.shared_cores)
        conserving[0] = True
        # start where a batch whose compute grows in proportion settles (it forms over one batch's compute, during
        # which the group is busy ``load`` of the time), or from full batches for a group with a delay
        batches = np.where(conserving, min(1.0 / (1.0 - min(settings.load, 0.99)), batch_size), float(batch_size))
        hops = _hops(len(bounds), settings.hop_ms)
        limit = settings.queueing_share * settings.slo_ms / len(bounds)
        for _ in range(_SETTLE_ROUNDS):
            compute = _group_compute(manifest, bounds, batches)
            cost = float((reached * (compute / batches + hops)).sum())
            arrivals = settings.load * settings.instances / cost * reached  # samples per ms reaching each group
            delays = np.where(conserving, 0.0, np.minimum(batch_size / np.maximum(arrivals, 1e-9), limit))
            # a group's replicas together compute its share of the load: one batch's worth of work is the time
            # a work-conserving batch forms in
            share = reached * compute / batches
            rate = settings.instances * share / share.sum()  # the group's profiled ms of compute per ms
            gathering = np.where(conserving, compute / rate, delays)  # ms during which a batch forms
            settled = np.clip(1.0 + arrivals * gathering, 1.0, batch_size)
            converged = np.allclose(settled, batches, rtol=1e-3)
            batches = settled
            if converged:
                break
        compute = _group_compute(manifest, bounds, batches)
        return cls(delays, batches, compute, float((reached * (compute / batches + hops)).sum()))


def resize(manifest: Manifest, exits: tuple[int, ...], batch_size: int, undecided: np.ndarray,
           settings: PlannerSettings) -> Sizing | None:
    """Queue delays, replicas and threads of the groups cut at ``exits`` when ``undecided[k]`` of the requests are
    still unanswered on reaching group ``k``; ``None`` when a full-depth sample would miss the objective.

    ``make_plan`` sizes every candidate this way from the validation split's exit rates; the controller re-sizes a
    deployed plan from the exit rates it observes (``controller.e3_resizer``), at the plan's batch size and exits.
    """
    bounds = _group_bounds(manifest, exits)
    reached = np.asarray(undecided, dtype=float)
    reached = reached + settings.sample_rate * (1.0 - reached)  # the traced share of answered samples runs on
    batching = _Batching.settle(manifest, bounds, reached, batch_size, settings)
    compute, delays, cost = batching.compute, batching.delays, batching.cost_ms
    share = reached * compute / batching.batches
    if settings.shared_cores:
        replicas = np.full(len(bounds), settings.instances)
        threads = 1
    else:
        replicas = np.maximum(1, np.round(settings.instances * share / share.sum())).astype(int)
        threads = max(1, settings.instances // int(replicas.sum()))
    slowdown = max(1.0, settings.profile_threads / threads)
    latency = float((compute * slowdown + delays).sum() + settings.hop_latency_ms * (len(bounds) - 1))
    if latency > settings.slo_ms:
        return None
    groups = tuple(GroupPlan(first, last, ramp, float(r), float(c), int(1000 * d), int(n))
                   for (first, last, ramp), r, c, d, n in zip(bounds, reached, compute, delays, replicas))
    return Sizing(groups, cost, latency, threads)
