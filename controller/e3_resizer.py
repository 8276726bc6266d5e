"""Re-size a deployed E3 plan when the exit rates it was sized for no longer hold.

The planner sized every block model (queue delay, replicas, threads) for the share of requests it expected to reach
it, from the validation split and the plan's thresholds. Both move in service: the controller tunes the thresholds,
and traffic drifts. The controller's window of an E3 entry holds its traced samples, a uniform sample of the traffic
(``triton_backend.e3_router``), so the share that now reaches each group is measured without bias. When one group's
share moved by more than ``drift``, the same groups are sized again for the measured shares, at the plan's batch size
and with its planner settings, and the plan goes one revision on. The service publishes it to Redis; every Triton
replica's router reloads its own block models to match (``triton_backend.plan_follower``). Exits stay where they are:
moving one takes other block models, hence a new ``prepare.e3``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from controller.e3_planner import PlannerSettings, resize
from controller.window import WindowView
from early_exit.e3_plan import E3Plan
from early_exit.exit_rule import NEVER_EXIT, first_exit
from early_exit.manifest import Manifest

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResizerSettings:
    """Args:
    drift: change of a group's share of requests (absolute, traced samples included) that calls for re-sizing.
    min_samples: traced samples the window must hold before its exit rates are trusted (at 0.1 drift, 200 samples
        put a share's standard error at 3.5 points at most).
    """

    drift: float = 0.1
    min_samples: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.drift < 1 or self.min_samples < 1:
            raise ValueError(f"drift must be in (0, 1) and min_samples >= 1, got {self.drift}, {self.min_samples}")


def undecided_shares(plan: E3Plan, view: WindowView, thresholds: Mapping[int, float]) -> np.ndarray:
    """Share of requests still unanswered on reaching each group of ``plan`` under ``thresholds``, measured on
    ``view`` (whose ramps include the plan's exits)."""
    rows = [view.ramps.index(ramp) for ramp in plan.exits]
    first = first_exit(view.confidence[rows], np.asarray([thresholds.get(r, NEVER_EXIT) for r in plan.exits]))
    return np.asarray([(first >= k).mean() for k in range(len(plan.groups))])


def resize_plan(plan: E3Plan, manifest: Manifest, view: WindowView, thresholds: Mapping[int, float],
                settings: ResizerSettings = ResizerSettings()) -> E3Plan | None:
    """``plan`` re-sized for the shares of requests ``view`` measures under ``thresholds``, one revision on; ``None``
    while they are within ``settings.drift`` of the ones it was sized for, when the window is too small to tell,
    when the plan carries no planner settings (prepared before they were recorded), or when no sizing of these
    groups meets the plan's latency objective any more (the plan in force then stays)."""
    if not plan.planner or view.size < settings.min_samples or not set(plan.exits) <= set(view.ramps):
        return None
    undecided = undecided_shares(plan, view, thresholds)
    reached = undecided + plan.sample_rate * (1.0 - undecided)  # the planner's survivors: traced samples run on
    try:
        sized_for = np.asarray(plan.expected.get("survivors", []), dtype=float)
        planner = PlannerSettings.from_sizing_fields(plan.planner)
    except (TypeError, ValueError) as exc:
        LOGGER.warning("%s: plan revision %d cannot be re-sized: %s", plan.source, plan.revision, exc)
        return None
    if sized_for.shape == reached.shape and np.abs(reached - sized_for).max() < settings.drift:
        return None
    sizing = resize(manifest, plan.exits, plan.groups[0].batch_size, undecided, planner)
    if sizing is None:
        LOGGER.warning("%s: %.0f%% of requests now reach its last block model; no sizing of its block models meets "
                       "the %.0f ms objective: keeping revision %d", plan.source, 100 * reached[-1], plan.slo_ms,
                       plan.revision)
        return None
    vanilla = float(plan.expected.get("vanilla_cost_ms", 0.0))
    expected = {"survivors": [float(r) for r in reached], "cost_ms": sizing.cost_ms, "latency_ms": sizing.latency_ms}
    if vanilla > 0:
        expected["capacity_gain"] = vanilla / sizing.cost_ms
    return plan.resized([group.queue_delay_us for group in sizing.groups], [group.replicas for group in sizing.groups],
                        sizing.threads if plan.instance_kind == "KIND_CPU" else 0, expected)
