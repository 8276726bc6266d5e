"""E3 re-sizing: a plan is sized again when the share of requests reaching its block models drifted, not before."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from controller.e3_planner import PlannerSettings
from controller.e3_resizer import ResizerSettings, resize_plan
from controller.window import FeedbackWindow, WindowView
from early_exit.e3_plan import BlockGroup, E3Plan
from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.manifest import BlockSpec, Manifest, Profile, RampSpec, TensorSpec

X, V = TensorSpec("x", "float32", (4,)), TensorSpec("v0", "float32", (4,))
SIZES = (1, 8)


def _manifest() -> Manifest:
    """Two blocks, a ramp after the first; the second costs ten times the first."""
    blocks = (BlockSpec("b0", ("x",), ("v0",), ""), BlockSpec("b1", ("v0",), ("v1",), ""))
    profile = Profile("cpu", SIZES, ((1.0, 2.0), (10.0, 20.0)), ((0.01, 0.02),))
    return Manifest("m_e3", 2, (X,), blocks, (RampSpec(0, 0, {"kind": "linear", "features": 4, "classes": 2}),), "r",
                    "", {0: 0.9}, profile, exits_fixed=True)


def _plan(survivors: list[float], instances: int = 4) -> E3Plan:
    settings = PlannerSettings(slo_ms=1000.0, instances=instances, sample_rate=0.0)
    groups = (BlockGroup(0, 0, 0, (X,), (V,), 8, 0, 1), BlockGroup(1, 1, None, (V,), (), 8, 0, 1))
    return E3Plan("m", groups, {0: 0.9}, 0.0, 1000.0, {"survivors": survivors, "vanilla_cost_ms": 2.75},
                  planner=settings.sizing_fields())


def _view(n: int, exiting: float, seed: int = 0) -> WindowView:
    """Traced samples of which ``exiting`` clear ramp 0's 0.9 threshold."""
    rng = np.random.default_rng(seed)
    window = FeedbackWindow(4 * n)
    for _ in range(n // 8):
        confidence = np.where(rng.random((1, 8)) < exiting, 0.99, 0.5).astype(np.float32)
        final = rng.integers(0, 2, 8).astype(np.int32)
        window.add(FeedbackRecord("m_e3", 1, (0,), confidence, final[None, :], final,
                                  np.where(confidence[0] > 0.9, 0, 1).astype(np.int16),
                                  BatchTiming(5.0, 0.0, 0.0, np.full(8, 5.0))))
    return window.view()


def test_exit_rates_within_the_drift_keep_the_plan() -> None:
    assert resize_plan(_plan([1.0, 0.5]), _manifest(), _view(800, exiting=0.45), {0: 0.9}) is None


def test_drifted_exit_rates_resize_the_block_models_one_revision_on() -> None:
    plan = _plan([1.0, 0.9])
    resized = resize_plan(plan, _manifest(), _view(800, exiting=0.7), {0: 0.9})
    assert resized is not None and resized.revision == plan.revision + 1 and resized.same_groups(plan)
    assert resized.expected["survivors"][0] == 1.0 and abs(resized.expected["survivors"][1] - 0.3) < 0.06
    # The deep group now carries less of the compute: fewer of the four instances, and its batches fill slower.
    assert resized.groups[1].replicas < 4 and resized.groups[1].queue_delay_us > 0
    assert resized.expected["capacity_gain"] > 1.0


def test_thresholds_in_use_decide_who_exits() -> None:
    closed = resize_plan(_plan([1.0, 0.3]), _manifest(), _view(800, exiting=0.7), {0: 1.0})
    assert closed is not None and closed.expected["survivors"] == [1.0, 1.0]


def test_small_windows_and_plans_without_planner_settings_are_not_resized() -> None:
    view = _view(800, exiting=0.7)
    assert resize_plan(_plan([1.0, 0.9]), _manifest(), _view(64, exiting=0.7), {0: 0.9}) is None
    assert resize_plan(replace(_plan([1.0, 0.9]), planner={}), _manifest(), view, {0: 0.9}) is None
    assert resize_plan(_plan([1.0, 0.9]), _manifest(), view, {0: 0.9}, ResizerSettings(drift=0.7)) is None
    hand_edited = replace(_plan([1.0, 0.9]), planner={"slo_ms": "fast"})
    assert resize_plan(hand_edited, _manifest(), view, {0: 0.9}) is None  # logged; the service keeps running
