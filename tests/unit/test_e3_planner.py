"""E3 planner: exits that save compute are chosen, ones that do not are not, and the SLO bounds the batch size."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from controller.e3_planner import PlannerSettings, make_plan, resize
from controller.guard import AccuracyGuard
from controller.tuner import TunerSettings
from early_exit.manifest import BlockSpec, Manifest, Profile, RampSpec, TensorSpec

SIZES = (1, 8, 32)


def _manifest(block_ms: tuple[float, float, float] = (1.0, 4.0, 16.0), fixed: float = 0.25) -> Manifest:
    """Four blocks, ramps after the first three; block latency grows linearly with the batch (per-sample cost
    falls with batching: a ``fixed`` share of the batch-1 time)."""
    blocks = tuple(BlockSpec(f"b{i}", ("x",) if i == 0 else (f"v{i - 1}",), (f"v{i}",), "") for i in range(4))
    ramps = tuple(RampSpec(i, i, {"kind": "linear", "features": 4, "classes": 2}) for i in range(3))
    rows = tuple(tuple(ms * (fixed + (1 - fixed) * b) for b in SIZES) for ms in (*block_ms, 1.0))
    profile = Profile("cpu", SIZES, rows, ((0.01, 0.02, 0.05),) * 3)
    return Manifest("m", 2, (TensorSpec("x", "float32", (4,)),), blocks, ramps, "r", "", {}, profile)


def _window(n: int = 4000, easy_at_first_ramp: float = 0.6, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Ramp 0 is confident and right on an ``easy`` share of samples; ramps 1 and 2 are never confident."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, n)
    easy = rng.random(n) < easy_at_first_ramp
    confidence = np.full((3, n), 0.55, dtype=np.float32)
    confidence[0, easy] = 0.99
    prediction = np.stack([np.where(easy, final, 1 - final), 1 - final, 1 - final])
    return confidence, prediction, final


def _settings(**overrides: object) -> PlannerSettings:
    base = {"slo_ms": 500.0, "hop_ms": 0.01, "tuner": TunerSettings(guard=AccuracyGuard(0.01, 0.0))}
    return PlannerSettings(**{**base, **overrides})


def test_a_confident_early_ramp_becomes_an_exit_and_saves_compute() -> None:
    plan = make_plan(_manifest(), *_window(), _settings())
    assert plan.thresholds and plan.thresholds[0] <= float(np.float32(0.99))
    assert plan.groups[0].ramp == 0 and plan.groups[-1].ramp is None
    assert plan.groups[1].survivors == pytest.approx(0.4 + 0.05 * 0.6, abs=0.03)  # survivors plus the traced share
    assert plan.capacity_gain > 1.5 and plan.agreement >= 0.99


def test_useless_ramps_are_not_exits() -> None:
    plan = make_plan(_manifest(), *_window(), _settings())
    assert set(plan.thresholds) == {0}


def test_exits_are_not_worth_a_hop_that_costs_more_than_they_save() -> None:
    plan = make_plan(_manifest(), *_window(easy_at_first_ramp=0.05), _settings(hop_ms=5.0))
    assert plan.thresholds == {} and len(plan.groups) == 1


def test_the_slo_bounds_the_batches_groups_wait_for() -> None:
    relaxed = make_plan(_manifest(), *_window(), _settings(slo_ms=5000.0))
    tight = make_plan(_manifest(), *_window(), _settings(slo_ms=100.0))
    assert tight.latency_ms <= 100.0 < relaxed.latency_ms
    # Waiting less, the tight plan's later group runs smaller batches, which cost more per sample.
    assert tight.groups[-1].compute_ms < relaxed.groups[-1].compute_ms and tight.cost_ms > relaxed.cost_ms
    # The router's first group never waits: its workers take what queued while they were busy.
    assert tight.groups[0].queue_delay_us == relaxed.groups[0].queue_delay_us == 0


def test_on_shared_cores_no_group_waits_and_batches_grow_with_the_load() -> None:
    manifest, window = _manifest(), _window()
    light, heavy = (make_plan(manifest, *window, _settings(shared_cores=True, load=load), exits=(0,))
                    for load in (0.2, 0.9))
    assert all(g.queue_delay_us == 0 for g in (*light.groups, *heavy.groups))
    # a work-conserving batch holds what arrived while the group computed the one before: more at higher load
    assert all(busy.compute_ms > idle.compute_ms for busy, idle in zip(heavy.groups, light.groups))
    assert heavy.cost_ms < light.cost_ms


def test_a_group_few_samples_reach_is_costed_at_the_batches_it_gets() -> None:
    manifest, settings = _manifest(), _settings(slo_ms=200.0, sample_rate=0.0)
    undecided = np.asarray([1.0, 0.05])
    sizing = resize(manifest, (1,), 32, undecided, settings)
    assert sizing is not None
    block_ms, ramp_ms = manifest.profile.at(32)
    full_batches = (block_ms[:2].sum() + ramp_ms[1]) / 32 + 0.05 * (block_ms[2:].sum() / 32 + settings.hop_ms)
    # the deep group's 5 % of the samples cannot fill batches of 32 within its delay
    assert sizing.groups[1].compute_ms < block_ms[2:].sum()
    assert sizing.cost_ms > full_batches


def test_an_objective_nothing_meets_is_an_error() -> None:
    with pytest.raises(ValueError, match="no plan"):
        make_plan(_manifest(), *_window(), _settings(slo_ms=1.0))


def test_forced_exits_are_planned_as_given() -> None:
    plan = make_plan(_manifest(), *_window(), _settings(), exits=(1, 2))
    assert [g.ramp for g in plan.groups] == [1, 2, None]
    with pytest.raises(ValueError, match="ramps"):
        make_plan(_manifest(), *_window(), _settings(), exits=(7,))


def test_replicas_follow_the_compute_each_group_carries() -> None:
    plan = make_plan(_manifest((1.0, 1.0, 30.0)), *_window(easy_at_first_ramp=0.0), _settings(instances=8),
                     exits=(1,))
    assert plan.groups[-1].replicas > plan.groups[0].replicas >= 1


def test_groups_sharing_cores_get_an_instance_per_core_each() -> None:
    settings = _settings(slo_ms=5000.0, hop_latency_ms=0.0, queueing_share=0.0, profile_threads=2, instances=2,
                         shared_cores=True)
    plan = make_plan(_manifest((1.0, 1.0, 30.0)), *_window(), settings, exits=(0, 1))
    assert [g.replicas for g in plan.groups] == [2, 2, 2]
    # every instance is single-threaded: the profile's two threads' compute takes twice as long
    assert plan.latency_ms == pytest.approx(2 * sum(g.compute_ms for g in plan.groups))


def test_latency_counts_the_slower_compute_of_instances_with_fewer_threads_and_each_hop() -> None:
    settings = _settings(slo_ms=5000.0, hop_latency_ms=3.0, queueing_share=0.0, profile_threads=2, instances=2)
    plan = make_plan(_manifest(), *_window(), settings, exits=(0, 1))
    compute = sum(g.compute_ms for g in plan.groups)
    # three single-instance groups on two cores: one thread each, half the profile's two; the router runs the
    # first group, so two hops
    assert plan.latency_ms == pytest.approx(2 * compute + 2 * 3.0)


def test_the_first_group_pays_no_hop_and_a_plan_without_exits_costs_what_the_original_model_does() -> None:
    manifest = _manifest(fixed=0.0)  # per-sample compute independent of the batch, which a hop's cost changes
    no_exit = make_plan(manifest, *_window(), _settings(hop_ms=5.0), exits=())
    assert no_exit.cost_ms == pytest.approx(no_exit.vanilla_cost_ms)
    cheap, dear = (make_plan(manifest, *_window(), _settings(hop_ms=hop), exits=(1,)) for hop in (0.0, 5.0))
    # the hop is paid by the samples reaching the second group only
    assert dear.cost_ms - cheap.cost_ms == pytest.approx(5.0 * dear.groups[1].survivors, rel=0.05)


def test_a_deployed_plan_is_resized_for_the_exit_rates_observed() -> None:
    manifest, settings = _manifest((1.0, 1.0, 30.0)), _settings(instances=8, slo_ms=5000.0, sample_rate=0.0)
    most_exit = resize(manifest, (1,), 8, np.asarray([1.0, 0.1]), settings)
    few_exit = resize(manifest, (1,), 8, np.asarray([1.0, 0.9]), settings)
    assert most_exit is not None and few_exit is not None
    # More survivors: the deep group carries more of the compute, gets more of the instances, fills batches sooner.
    assert few_exit.groups[1].replicas > most_exit.groups[1].replicas
    assert few_exit.groups[1].queue_delay_us < most_exit.groups[1].queue_delay_us
    assert few_exit.cost_ms > most_exit.cost_ms
    assert resize(manifest, (1,), 8, np.asarray([1.0, 0.9]), replace(settings, slo_ms=1.0)) is None


def test_planner_settings_travel_with_the_plan_without_the_tuner() -> None:
    settings = _settings(instances=4, shared_cores=True)
    fields = settings.sizing_fields()
    assert "tuner" not in fields and json.loads(json.dumps(fields)) == fields
    assert PlannerSettings.from_sizing_fields(fields) == replace(settings, tuner=TunerSettings())
    with pytest.raises(ValueError, match="planner settings"):
        PlannerSettings.from_sizing_fields({**fields, "bogus": 1})
