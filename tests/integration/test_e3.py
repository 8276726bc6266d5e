"""E3 mode on a real Triton + Redis: the router answers plain unary calls like the Apparate entry, exited samples
stop computing (bar the traced share), later blocks batch survivors of many requests, and a block model unloaded
mid-traffic costs errors, never hangs."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
import tritonclient.http as httpclient

from controller.config_store import publish_plan, read_plan, write_config
from controller.prepare.e3 import main as plan_e3
from early_exit.e3_plan import PLAN_FILE, E3Plan
from early_exit.exit_config import ExitConfig
from early_exit.feedback import FeedbackRecord
from early_exit.keys import RedisKeys
from early_exit.manifest import load_manifest
from early_exit.runtime import EarlyExitModel
from tests.conftest import MODEL
from tests.integration.conftest import apply_config
from workload.client import Answer, replay
from workload.metrics import metric
from workload.stack import Stack, cpu_used, running_stack, start_controller

pytestmark = pytest.mark.integration
E3 = f"{MODEL}_e3"
SAMPLE_RATE = 0.2


@pytest.fixture(scope="module")
def plan(repository: Path) -> E3Plan:
    """Two exits, a quarter and two thirds of the way in, traced at ``SAMPLE_RATE`` from the first request (no
    warm-up: the tests count what the sampled share sends on)."""
    ramps = len(load_manifest(repository / MODEL / "1").ramps)
    exits = f"{ramps // 4},{2 * ramps // 3}"
    assert plan_e3(["--name", MODEL, "--repository", str(repository), "--exits", exits, "--slo-ms", "2000",
                    "--sample-rate", str(SAMPLE_RATE), "--warmup-traced", "0"]) == 0
    return E3Plan.from_json((repository / E3 / "1" / PLAN_FILE).read_text())


@pytest.fixture(scope="module")
def e3_stack(repository: Path, plan: E3Plan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(repository, models=[MODEL, E3, *plan.block_models(E3)], with_controller=False,
                       log_dir=tmp_path_factory.mktemp("e3_logs")) as stack:
        yield stack


@pytest.fixture(scope="module")
def thresholds(repository: Path, plan: E3Plan, test_images: np.ndarray) -> dict[int, float]:
    """Thresholds at which about a fifth of the test images exit at each exit."""
    model = EarlyExitModel(repository / MODEL / "1")
    with torch.inference_mode():
        verdicts = list(model.stages({"IMAGE": torch.from_numpy(test_images[:500])}, plan.exits))
    return {ramp: float(np.quantile(v.confidence, 0.8)) for ramp, v in zip(plan.exits, verdicts)}


def _configure(stack: Stack, thresholds: dict[int, float], version: int) -> None:
    for model in (MODEL, E3):
        apply_config(stack, model, version, thresholds)


def _block_counts(stack: Stack, blocks: list[str]) -> np.ndarray:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{stack.ports.http}")
    stats = {m["name"]: m for m in client.get_inference_statistics()["model_stats"]}
    return np.asarray([[int(stats[b]["inference_count"]), int(stats[b]["execution_count"])] for b in blocks])


def _feedback(stack: Stack) -> list[FeedbackRecord]:
    client = redis.Redis.from_url(stack.redis_url)
    return [FeedbackRecord.decode(fields) for _, fields in client.xrange(RedisKeys(E3).feedback)]


def test_a_plan_that_saves_no_compute_says_so(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(repository / MODEL, tmp_path / MODEL)  # the plan is written beside it, not over the fixture's
    with caplog.at_level("WARNING", logger="controller.prepare.e3"):
        assert plan_e3(["--name", MODEL, "--repository", str(tmp_path), "--exits", "", "--slo-ms", "2000"]) == 0
    assert "E3 saves no compute on this model" in caplog.text  # one group: the original model, run by the router


def test_the_router_answers_unary_grpc_and_http_calls_like_the_apparate_entry(
    e3_stack: Stack, thresholds: dict[int, float], test_images: np.ndarray
) -> None:
    _configure(e3_stack, thresholds, 1)
    images = {"IMAGE": test_images[:200]}
    arrivals = np.arange(200) * 0.01
    e3 = replay(e3_stack.grpc_url, E3, images, arrivals)
    apparate = replay(e3_stack.grpc_url, MODEL, images, arrivals)
    assert not [a.error for a in e3 if a.error]
    assert [(a.label, a.exit) for a in e3] == [(a.label, a.exit) for a in apparate]
    assert len({a.exit for a in e3}) == 3  # both exits and the final layer answered some
    client = httpclient.InferenceServerClient(f"127.0.0.1:{e3_stack.ports.http}")
    for index in range(5):
        tensor = httpclient.InferInput("IMAGE", [1, *test_images.shape[1:]], "UINT8")
        tensor.set_data_from_numpy(test_images[index : index + 1])
        result = client.infer(E3, [tensor])
        assert int(result.as_numpy("LABEL")[0, 0]) == apparate[index].label
        assert int(result.as_numpy("EXIT")[0, 0]) == apparate[index].exit


def test_each_replica_of_the_first_group_is_a_router_instance_on_a_cpu(e3_stack: Stack, plan: E3Plan) -> None:
    """A router instance is a process: the first group's replicas do not share one Python lock."""
    assert plan.instance_kind == "KIND_CPU" and plan.groups[0].replicas > 1
    config = httpclient.InferenceServerClient(f"127.0.0.1:{e3_stack.ports.http}").get_model_config(E3)
    assert int(config["instance_group"][0]["count"]) == plan.groups[0].replicas


def test_exited_samples_reach_later_blocks_only_when_traced(
    e3_stack: Stack, plan: E3Plan, thresholds: dict[int, float], test_images: np.ndarray
) -> None:
    _configure(e3_stack, thresholds, 2)
    time.sleep(1.0)  # feedback of earlier requests is on its way (the publisher ships every 0.25 s)
    blocks = plan.block_models(E3)
    before, traced_before = _block_counts(e3_stack, blocks), len(_feedback(e3_stack))
    answers = replay(e3_stack.grpc_url, E3, {"IMAGE": test_images[200:600]}, np.arange(400) * 0.005)
    assert not [a.error for a in answers if a.error]
    time.sleep(1.0)  # the publisher ships feedback every 0.25 s
    reached = (_block_counts(e3_stack, blocks) - before)[:, 0]
    exits = np.asarray([plan.exits.index(a.exit) if a.exit in plan.exits else len(plan.exits) for a in answers])
    traces = _feedback(e3_stack)[traced_before:]
    traced_exits = np.concatenate([r.exit for r in traces])
    traced_at = np.asarray([plan.exits.index(e) if e in plan.exits else len(plan.exits) for e in traced_exits])
    for group, count in enumerate(reached, start=1):
        # A group's block model sees the samples that did not exit before it, plus the traced ones that did.
        assert count == (exits >= group).sum() + (traced_at < group).sum()
    assert 0 < len(traced_exits) < 400 * SAMPLE_RATE * 2  # a sampled share, not everything
    assert all(r.ramps == plan.exits for r in traces)


def test_a_router_traces_every_one_of_its_first_samples_then_the_sampled_share(
    e3_stack: Stack, plan: E3Plan, test_images: np.ndarray
) -> None:
    per_instance = 20
    e3_stack.reload(E3, {"warmup_traced": str(per_instance * plan.groups[0].replicas)})
    try:
        time.sleep(1.0)  # feedback of earlier requests is on its way (the publisher ships every 0.25 s)
        before = len(_feedback(e3_stack))
        # requests one at a time: whichever instance serves them, none has traced its first 20 yet
        answers = replay(e3_stack.grpc_url, E3, {"IMAGE": test_images[:per_instance]}, np.arange(per_instance) * 0.05)
        assert not [a.error for a in answers if a.error]
        time.sleep(1.0)
        warm = _feedback(e3_stack)[before:]
        assert sum(len(r.final) for r in warm) == per_instance
        answers = replay(e3_stack.grpc_url, E3, {"IMAGE": test_images[:400]}, np.arange(400) * 0.005)
        assert not [a.error for a in answers if a.error]
        time.sleep(1.0)
        traced = sum(len(r.final) for r in _feedback(e3_stack)[before + len(warm):])
        assert per_instance <= traced < per_instance + 400 * SAMPLE_RATE * 2  # the rest of the warm-up, then a share
    finally:
        e3_stack.reload(E3, {"warmup_traced": "0"})


def test_later_blocks_batch_the_survivors_of_many_requests(
    e3_stack: Stack, plan: E3Plan, thresholds: dict[int, float], test_images: np.ndarray
) -> None:
    _configure(e3_stack, thresholds, 3)
    models = [E3, *plan.block_models(E3)]
    before = _block_counts(e3_stack, models)
    replay(e3_stack.grpc_url, E3, {"IMAGE": test_images[:256]}, np.zeros(256))
    (routed, batches), (last, last_runs) = (_block_counts(e3_stack, models) - before)[[0, -1]]
    assert last < routed  # samples exited on the way
    # In place, the last block would run the batches the requests arrived in, shrunk to the share that survives.
    in_place = routed / batches * last / routed
    assert last / last_runs > in_place


def test_cpu_is_accounted_to_the_router_and_each_block_model(
    e3_stack: Stack, plan: E3Plan, test_images: np.ndarray
) -> None:
    triton = e3_stack.process("triton")
    before = triton.cpu_by_process()
    replay(e3_stack.grpc_url, E3, {"IMAGE": test_images[:200]}, np.zeros(200))
    used = cpu_used(before, triton.cpu_by_process())
    blocks = plan.block_models(E3)
    assert {"tritonserver", E3, MODEL, *blocks} <= set(used)  # every loaded model's stubs, found by their folder
    assert used[blocks[0]] > 0 and used[E3] > 4 * used[MODEL]  # MODEL got no traffic: its stub idled


def test_a_block_model_unloaded_mid_traffic_costs_errors_not_hangs(
    e3_stack: Stack, plan: E3Plan, test_images: np.ndarray
) -> None:
    middle = plan.block_models(E3)[0]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{e3_stack.ports.http}")
    answers: list[Answer] = []
    traffic = threading.Thread(target=replay, args=(e3_stack.grpc_url, E3, {"IMAGE": test_images[:600]},
                                                    np.arange(600) * 0.005), kwargs={"answers": answers})
    traffic.start()
    time.sleep(1.0)
    client.unload_model(middle)
    traffic.join(timeout=120)
    assert not traffic.is_alive()  # replay raises (and the thread ends) only once every answer came back
    assert len(answers) == 600 and all(a.done == a.done for a in answers)  # each answered: no NaN completion
    failed = [a for a in answers if a.error]
    assert failed and all(middle in a.error or "unavailable" in a.error.lower() for a in failed)
    client.load_model(middle)
    assert not replay(e3_stack.grpc_url, E3, {"IMAGE": test_images[:20]}, np.zeros(20))[0].error


def test_a_configuration_naming_a_ramp_that_is_not_an_exit_is_rejected(
    e3_stack: Stack, plan: E3Plan, thresholds: dict[int, float]
) -> None:
    rejected = metric(e3_stack.metrics_url, "apparate_config_rejections_total", model=E3)
    version = metric(e3_stack.metrics_url, "apparate_config_version", model=E3)
    outsider = next(r for r in range(100) if r not in plan.exits)
    client = redis.Redis.from_url(e3_stack.redis_url)
    write_config(client, RedisKeys(E3), ExitConfig(E3, int(version) + 1, {**thresholds, outsider: 0.5}))
    deadline = time.monotonic() + 5
    while metric(e3_stack.metrics_url, "apparate_config_rejections_total", model=E3) == rejected:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(e3_stack.metrics_url, "apparate_config_version", model=E3) == version


# Re-sizing changes the deployment the tests above measured: these come last, and each restores the prepared sizing.

def _plan_in_force(stack: Stack, timeout: float = 10.0) -> E3Plan:
    """The plan in Redis (the router registers it as prepared within its first poll)."""
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout
    while (plan := read_plan(client, RedisKeys(E3))) is None:
        assert time.monotonic() < deadline, "the router never registered its plan"
        time.sleep(0.1)
    return plan


def _served_sizing(stack: Stack, plan: E3Plan) -> list[tuple[int, int]]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{stack.ports.http}")
    configs = [client.get_model_config(name) for name in plan.block_models(E3)]
    return [(int(c["dynamic_batching"]["max_queue_delay_microseconds"]), int(c["instance_group"][0]["count"]))
            for c in configs]


def _wait_for_sizing(stack: Stack, plan: E3Plan, timeout: float = 90.0) -> None:
    """Until Triton serves every block model of ``plan`` as it is sized (the router runs the first group)."""
    wanted = [(g.queue_delay_us, g.replicas) for g in plan.groups[1:]]
    deadline = time.monotonic() + timeout
    while _served_sizing(stack, plan) != wanted:
        assert time.monotonic() < deadline, f"served {_served_sizing(stack, plan)}, plan says {wanted}"
        time.sleep(0.2)


def _restore(stack: Stack, prepared: E3Plan) -> None:
    in_force = _plan_in_force(stack)
    again = in_force.resized([g.queue_delay_us for g in prepared.groups], [g.replicas for g in prepared.groups],
                             prepared.threads, prepared.expected)
    assert publish_plan(redis.Redis.from_url(stack.redis_url), RedisKeys(E3), again)
    _wait_for_sizing(stack, again)


def test_a_resized_plan_reloads_the_block_models_mid_traffic_and_fails_no_request(
    e3_stack: Stack, plan: E3Plan, thresholds: dict[int, float], test_images: np.ndarray
) -> None:
    _configure(e3_stack, thresholds, 10)
    prepared = _plan_in_force(e3_stack)
    assert prepared.revision == 0 and prepared.sizing == plan.sizing
    resized = prepared.resized([g.queue_delay_us + 1234 * (k > 0) for k, g in enumerate(prepared.groups)],
                               [1 if g.replicas > 1 else 2 for g in prepared.groups], prepared.threads, {})
    answers: list[Answer] = []
    traffic = threading.Thread(target=replay, args=(e3_stack.grpc_url, E3, {"IMAGE": test_images[:1000]},
                                                    np.arange(1000) * 0.01), kwargs={"answers": answers})
    traffic.start()
    time.sleep(0.5)
    assert publish_plan(redis.Redis.from_url(e3_stack.redis_url), RedisKeys(E3), resized)
    _wait_for_sizing(e3_stack, resized)
    deadline = time.monotonic() + 5
    while metric(e3_stack.metrics_url, "apparate_e3_plan_revision", model=E3) != resized.revision:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    traffic.join(timeout=120)
    assert len(answers) == 1000 and not [a.error for a in answers if a.error]
    stale = replace(resized, revision=0)
    assert not publish_plan(redis.Redis.from_url(e3_stack.redis_url), RedisKeys(E3), stale)  # never goes back
    _restore(e3_stack, prepared)


def test_the_controller_resizes_the_block_models_when_exit_rates_drift(
    e3_stack: Stack, plan: E3Plan, thresholds: dict[int, float], test_images: np.ndarray, tmp_path: Path
) -> None:
    _configure(e3_stack, thresholds, 20)
    prepared = _plan_in_force(e3_stack)
    client = redis.Redis.from_url(e3_stack.redis_url)
    # As if sized when nearly everything exited at the first exit: whatever the controller's thresholds do now, the
    # shares reaching the later block models are far from these.
    stale = prepared.resized([g.queue_delay_us for g in prepared.groups], [g.replicas for g in prepared.groups],
                             prepared.threads, {"survivors": [1.0, *(0.05 for _ in prepared.groups[1:])]})
    assert publish_plan(client, RedisKeys(E3), stale)
    controller = start_controller(e3_stack.redis_url, tmp_path, ["--model", E3, "--min-fresh", "64"])
    try:
        time.sleep(3.0)  # it discovers the model and joins its feedback stream from now on
        # 125 req/s: the re-sized block models reload under this traffic, with the controller on the same cores
        # (at 250 req/s a slow machine's router reached its cap of requests in flight and refused some)
        answers = replay(e3_stack.grpc_url, E3, {"IMAGE": np.concatenate([test_images] * 2)[:2000]},
                         np.arange(2000) * 0.008)
        assert not [a.error for a in answers if a.error]
        deadline = time.monotonic() + 30
        while (in_force := _plan_in_force(e3_stack)).revision == stale.revision:
            assert time.monotonic() < deadline, controller.log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        controller.stop()
    assert in_force.revision == stale.revision + 1 and in_force.same_groups(prepared)
    survivors = in_force.expected["survivors"]
    assert survivors[0] == pytest.approx(1.0) and max(s - 0.05 for s in survivors[1:]) >= 0.1
    _wait_for_sizing(e3_stack, in_force)  # every replica's router applied it
    _restore(e3_stack, prepared)


def test_a_plan_left_by_an_earlier_deployment_gives_way_to_the_routers_own(e3_stack: Stack, plan: E3Plan) -> None:
    client = redis.Redis.from_url(e3_stack.redis_url)
    earlier = replace(plan, origin="an-earlier-prepare", revision=7,
                      groups=tuple(replace(g, queue_delay_us=g.queue_delay_us + 999) for g in plan.groups))
    client.set(RedisKeys(E3).e3_plan, earlier.to_json())
    deadline = time.monotonic() + 10
    while (in_force := _plan_in_force(e3_stack)).origin != plan.origin:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert in_force == plan  # as prepared: the earlier deployment's sizing was never applied
    _wait_for_sizing(e3_stack, plan, timeout=5)
