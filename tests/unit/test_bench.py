"""The bench's hindsight yardstick (the best thresholds for known inputs at an agreement floor) and the repository
it serves its systems from, and the configuration each system is served with."""

from pathlib import Path

import numpy as np
import pytest
import redis

from controller.config_store import read_config
from controller.latency import LatencyModel
from controller.tuner import Evaluation, evaluate
from early_exit.keys import RedisKeys
from workload.bench import (
    Run,
    bench_repository,
    best_thresholds,
    budget_bound,
    entry,
    fixed_entry,
    paired_difference,
    round_savings,
    serve_as,
    workload_inputs,
)
from workload.client import Answer

LATENCY = LatencyModel(block_ms=np.ones(4), ramp_ms=np.full(3, 0.05), ramp_after_block=np.array([0, 1, 2]))


def _verdicts(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ramp 0 agrees with the final layer above confidence 0.7, ramp 1 never, ramp 2 above 0.3."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 10, n)
    confidence = rng.random((3, n))
    agrees = np.stack([confidence[0] > 0.7, np.zeros(n, dtype=bool), confidence[2] > 0.3])
    prediction = np.where(agrees, final, (final + 1) % 10)
    return confidence, prediction, final


def _outcome(thresholds: dict[int, float], confidence: np.ndarray, prediction: np.ndarray,
             final: np.ndarray) -> Evaluation:
    active = list(thresholds)
    return evaluate(np.array(list(thresholds.values())), confidence[active], prediction[active] == final[None, :],
                    LATENCY.exit_latencies(active))


def test_best_thresholds_meet_the_floor_and_spend_the_budget() -> None:
    confidence, prediction, final = _verdicts()
    best = best_thresholds(confidence, prediction, final, LATENCY, [0, 1, 2])
    outcome = _outcome(best, confidence, prediction, final)
    assert 0.99 <= outcome.accuracy < 0.995  # within the budget, and using it: a ceiling, not a safe setting
    assert outcome.saving_ms > 0
    assert budget_bound(confidence, prediction, final, LATENCY) == (outcome.saving_ms / LATENCY.vanilla_ms,
                                                                    outcome.median_saving_ms / LATENCY.vanilla_ms)


def test_ramps_that_exit_nothing_are_dropped_so_their_cost_is_not_paid() -> None:
    confidence, prediction, final = _verdicts()
    exact = best_thresholds(confidence, prediction, final, LATENCY, [0, 1, 2], floor=1.0)
    assert sorted(exact) == [0, 2]  # ramp 1 agrees on nothing, so at no loss it cannot exit
    assert exact[0] > 0.7 and exact[2] > 0.3
    assert _outcome(exact, confidence, prediction, final).accuracy == 1.0
    assert best_thresholds(confidence, prediction, final, LATENCY, [1], floor=1.0) == {}


def test_a_higher_floor_is_met_and_never_saves_more() -> None:
    confidence, prediction, final = _verdicts()
    savings = []
    for floor in (0.99, 0.995, 0.999):
        outcome = _outcome(best_thresholds(confidence, prediction, final, LATENCY, [0, 2], floor),
                           confidence, prediction, final)
        assert outcome.accuracy >= floor
        savings.append(outcome.saving_ms)
    assert savings == sorted(savings, reverse=True)


def test_only_the_candidates_are_tuned() -> None:
    confidence, prediction, final = _verdicts()
    assert list(best_thresholds(confidence, prediction, final, LATENCY, [2])) == [2]


def _entry(repository: Path, name: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "1" / "manifest.json").write_text("{}")
    (repository / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "apparate"\nmax_batch_size: 8\n')


def test_the_fixed_twin_serves_the_same_files_under_its_own_name(tmp_path: Path) -> None:
    for name in ("m", "m_vanilla", "other"):
        _entry(tmp_path, name)
    with bench_repository(tmp_path, "m") as view:
        assert sorted(p.name for p in view.iterdir()) == ["m", "m_fixed", "m_vanilla"]
        twin = view / fixed_entry("m")
        assert (twin / "config.pbtxt").read_text().splitlines()[:2] == ['name: "m_fixed"', 'backend: "apparate"']
        assert (twin / "1").resolve() == (tmp_path / "m" / "1").resolve()  # linked, not copied
        assert (view / "m_vanilla" / "config.pbtxt").read_text().startswith('name: "m_vanilla"')
    assert not view.exists()
    assert (tmp_path / "m" / "1" / "manifest.json").exists()  # removing the view leaves the repository alone


def test_only_adaptive_runs_on_the_entry_the_controller_controls() -> None:
    assert entry("m", "adaptive") == "m"
    assert entry("m", "vanilla") == "m_vanilla"
    assert {entry("m", system) for system in ("off", "static", "hindsight")} == {fixed_entry("m")}


def test_each_fixed_system_is_served_its_own_thresholds_on_the_shared_twin(client: redis.Redis) -> None:
    fixed = {"off": {}, "static": {0: 0.9}}
    twin = RedisKeys(fixed_entry("m"))
    for system, expected in (("static", {0: 0.9}), ("off", {}), ("static", {0: 0.9})):
        serve_as(client, "m", system, fixed)
        assert read_config(client, twin).thresholds == expected
    serve_as(client, "m", "adaptive", fixed)
    serve_as(client, "m", "vanilla", fixed)
    assert read_config(client, twin).thresholds == {0: 0.9}  # the controller's entry and vanilla leave it alone
    assert read_config(client, RedisKeys("m")) is None and read_config(client, RedisKeys("m_vanilla")) is None


def _run(system: str, latency_ms: np.ndarray, labels: np.ndarray) -> Run:
    """A run whose answers arrive out of request order, as a concurrent client records them."""
    order = np.random.default_rng(1).permutation(len(latency_ms))
    return Run(system, "poisson", [Answer(int(i), 0.0, latency_ms[i] / 1000.0, int(labels[i])) for i in order])


def test_paired_difference_compares_the_same_requests_segment_by_segment() -> None:
    original = np.zeros(400, dtype=int)
    segment = np.repeat(np.arange(4), 100)
    vanilla_ms = np.array([10.0, 20.0, 40.0, 10.0])[segment]  # the machine's speed changes between segments
    a_ms, b_ms = vanilla_ms * 0.6, vanilla_ms * np.array([0.7, 0.7, 0.7, 0.5])[segment]
    a_labels = np.where(np.arange(400) < 4, 1, 0)  # a disagrees on 4 requests, b on none
    paired = paired_difference(_run("a", a_ms, a_labels), _run("b", b_ms, original), _run("vanilla", vanilla_ms,
                                                                                          original), original, 4)
    np.testing.assert_allclose(paired.saving, [0.1, 0.1, 0.1, -0.1])
    assert paired.agreement == pytest.approx(-0.01)
    assert paired.agreement_se == pytest.approx(np.std((a_labels != 0).astype(float), ddof=1) / 20)
    assert "a ahead in 3" in paired.describe("a", "b")


def test_round_savings_give_the_range_over_segments() -> None:
    original = np.zeros(300, dtype=int)
    vanilla_ms = np.full(300, 10.0)
    run_ms = np.repeat([9.0, 5.0, 11.0], 100)
    low, high = round_savings(_run("a", run_ms, original), _run("vanilla", vanilla_ms, original), 300, 3)
    assert (low, high) == (pytest.approx(-0.1), pytest.approx(0.5))


def test_warm_up_inputs_are_their_own_and_as_many_as_asked() -> None:
    measured, warm, _, _ = workload_inputs("sst2", None, 40, 300)
    assert len(measured["INPUT_IDS"]) == 40 and len(warm["INPUT_IDS"]) == 300

    def rows(inputs: dict[str, np.ndarray]) -> set[bytes]:
        return {row.tobytes() for row in inputs["INPUT_IDS"]}

    assert len(rows(warm)) > 290  # distinct sentences (a few may tokenize alike)
    assert not rows(measured) & rows(warm)
