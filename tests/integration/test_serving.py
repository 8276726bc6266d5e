"""Serving path on a real Triton + Redis: early answers, exactly-once responses, hot reload, fail-static."""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from early_exit.exit_config import NEVER_EXIT, ExitConfig
from early_exit.feedback import FeedbackRecord
from early_exit.keys import RedisKeys
from early_exit.runtime import EarlyExitModel, Verdict
from tests.conftest import MODEL
from tests.integration.conftest import publish
from workload.client import Answer, poisson_arrivals, replay
from workload.metrics import metric
from workload.stack import Stack, start_redis

pytestmark = pytest.mark.integration
EARLY_RAMP = 2


def _wait_for(predicate, timeout: float, interval: float = 0.002) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if predicate():
            return time.perf_counter() - started
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def _background_traffic(stack: Stack, images: np.ndarray, rate: float, answers: list[Answer]) -> threading.Thread:
    """Replay ``images`` at ``rate`` (Poisson) from a thread, appending to ``answers``; the thread is started."""
    thread = threading.Thread(target=replay, args=(stack.grpc_url, MODEL, {"IMAGE": images},
                                                   poisson_arrivals(len(images), rate)), kwargs={"answers": answers})
    thread.start()
    return thread


@torch.inference_mode()
def _early_ramp(model: EarlyExitModel, images: np.ndarray) -> Verdict:
    """What ``EARLY_RAMP`` says about ``images``, computed in process."""
    return next(model.stages({"IMAGE": torch.from_numpy(images)}, [EARLY_RAMP]))


def _apply(stack: Stack, thresholds: dict[int, float]) -> int:
    config = publish(stack, thresholds)
    _wait_for(lambda: metric(stack.metrics_url, "apparate_config_version", model=MODEL) == config.version, 5)
    return config.version


def test_easy_requests_are_answered_first_and_every_request_exactly_once(
    stack: Stack, repository: Path, test_images: np.ndarray
) -> None:
    burst = test_images[:16]
    model = EarlyExitModel(repository / MODEL / "1")
    ramp_confidence = _early_ramp(model, burst).confidence
    threshold = float(np.median(ramp_confidence))  # half of the burst is "easy" for the early ramp
    _apply(stack, {EARLY_RAMP: threshold})
    ordered_pairs = total_pairs = 0
    timelines = []
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    blocker = grpcclient.InferInput("IMAGE", [32, *burst.shape[1:]], "UINT8")
    blocker.set_data_from_numpy(test_images[-32:])
    replay(stack.grpc_url, MODEL, {"IMAGE": burst}, np.zeros(len(burst)))  # warm-up: first batches run slower
    for _ in range(5):
        # Full batches keep the instance busy while the burst queues up, so the burst runs as one batch.
        for _ in range(3):
            client.async_infer(MODEL, [blocker], lambda result, error: None)
        time.sleep(0.005)
        answers = replay(stack.grpc_url, MODEL, {"IMAGE": burst}, np.zeros(len(burst)))
        assert all(a.error is None for a in answers)
        assert len({a.index for a in answers}) == len(burst)
        early = [a.done for a in answers if a.exit == EARLY_RAMP]
        late = [a.done for a in answers if a.exit == len(model.manifest.ramps)]
        assert early and late, "the burst should mix easy and hard inputs"
        start = min(a.sent for a in answers)
        timelines.append(sorted((round(1000 * (a.done - start), 1), a.exit) for a in answers))
        ordered_pairs += sum(e < l for e in early for l in late)
        total_pairs += len(early) * len(late)
        exited = np.array([a.exit == EARLY_RAMP for a in answers])
        np.testing.assert_array_equal(exited, ramp_confidence >= np.float32(threshold))
    assert ordered_pairs / total_pairs >= 0.9, f"(ms after the burst, exit) per burst: {timelines}"


def test_a_full_batch_holds_its_early_answers_to_its_end(
    stack: Stack, repository: Path, test_images: np.ndarray
) -> None:
    """Single requests queued behind a busy instance fill a batch (``max_batch_size`` samples): its early answers
    leave with the rest at its end instead of one round trip each while the queue waits, they are counted as held,
    and its feedback record says they were answered then."""
    model = EarlyExitModel(repository / MODEL / "1")
    burst = test_images[:32]
    confidence = _early_ramp(model, burst).confidence
    threshold = float(np.median(confidence))
    exiting = int((confidence >= np.float32(threshold)).sum())
    # Blockers (one request of 32 samples each: a full batch, but nothing to answer early) whose samples all reach
    # the final layer, so the burst's record is the only one that mixes exits.
    others = test_images[32:2000]
    hard = others[_early_ramp(model, others).confidence < np.float32(threshold)][:32]
    version = _apply(stack, {EARLY_RAMP: threshold})
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    blocker = grpcclient.InferInput("IMAGE", [32, *burst.shape[1:]], "UINT8")
    blocker.set_data_from_numpy(hard)
    stream = redis.Redis.from_url(stack.redis_url)
    last_id = (stream.xrevrange(RedisKeys(MODEL).feedback, count=1) or [(b"0-0", {})])[0][0]
    name = "apparate_answers_held_total"
    held = 0
    for _ in range(5):  # until the burst runs as one batch
        before = metric(stack.metrics_url, name, model=MODEL)
        for _ in range(3):
            client.async_infer(MODEL, [blocker], lambda result, error: None)
        time.sleep(0.005)
        answers = replay(stack.grpc_url, MODEL, {"IMAGE": burst}, np.zeros(len(burst)))
        assert all(a.error is None for a in answers)
        assert sum(a.exit == EARLY_RAMP for a in answers) == exiting
        time.sleep(1.0)  # counters reach Triton's metrics every 0.5 s
        held = metric(stack.metrics_url, name, model=MODEL) - before
        if held:
            break
    assert held == exiting

    def mixed() -> list[FeedbackRecord]:
        entries = stream.xrange(RedisKeys(MODEL).feedback, min=f"({last_id.decode()}")
        records = (FeedbackRecord.decode(fields) for _, fields in entries)
        return [r for r in records if r.config_version == version and len(set(r.exit.tolist())) > 1]

    _wait_for(lambda: any(r.batch_size == len(burst) for r in mixed()), 10, interval=0.1)
    for record in mixed():
        answered = record.timing.answer_ms
        exited = record.exit == EARLY_RAMP
        if record.batch_size == len(burst):  # held: every answer left at the end
            assert np.ptp(answered) == 0
        else:  # a batch below full sent its early answers as they were decided
            assert answered[exited].max() < answered[~exited].min()


def test_no_exit_answers_equal_the_vanilla_model(stack: Stack, test_images: np.ndarray) -> None:
    _apply(stack, {EARLY_RAMP: NEVER_EXIT})
    images = test_images[:64]
    arrivals = poisson_arrivals(len(images), 400)
    early_exit = replay(stack.grpc_url, MODEL, {"IMAGE": images}, arrivals)
    vanilla = replay(stack.grpc_url, f"{MODEL}_vanilla", {"IMAGE": images}, arrivals)
    assert [a.label for a in early_exit] == [a.label for a in vanilla]
    assert {a.exit for a in early_exit} == {a.exit for a in early_exit if a.exit == max(a.exit for a in early_exit)}


def test_malformed_configs_are_rejected_and_counted_while_serving_continues(
    stack: Stack, test_images: np.ndarray
) -> None:
    version = _apply(stack, {EARLY_RAMP: 0.9})
    before = metric(stack.metrics_url, "apparate_config_rejections_total", model=MODEL)
    client = redis.Redis.from_url(stack.redis_url)
    keys = RedisKeys(MODEL)
    bad_documents = [
        ExitConfig(MODEL, version + 1, {EARLY_RAMP: float("nan")}).to_json(),
        ExitConfig(MODEL, version + 2, {999: 0.5}).to_json(),
        ExitConfig(MODEL, version - 1, {EARLY_RAMP: 0.5}).to_json(),
    ]
    for document in bad_documents:
        client.set(keys.config, document)
        client.publish(keys.notify, "x")
        time.sleep(0.3)
    _wait_for(lambda: metric(stack.metrics_url, "apparate_config_rejections_total", model=MODEL) >= before + 3, 5)
    assert metric(stack.metrics_url, "apparate_config_version", model=MODEL) == version
    answers = replay(stack.grpc_url, MODEL, {"IMAGE": test_images[:32]}, poisson_arrivals(32, 200))
    assert all(a.error is None for a in answers)


def test_configs_apply_within_100ms_and_20_changes_under_load_fail_no_request(
    stack: Stack, test_images: np.ndarray
) -> None:
    delays = []
    for threshold in (0.95, 0.85, 0.75):
        config = publish(stack, {EARLY_RAMP: threshold})
        delays.append(
            _wait_for(lambda v=config.version: metric(stack.metrics_url, "apparate_config_version", model=MODEL) == v,
                      1.0)
        )
    assert max(delays) < 0.1, f"configuration applied after {max(delays) * 1000:.0f} ms"

    images = test_images[:800]
    answers: list[Answer] = []
    traffic = _background_traffic(stack, images, 250, answers)
    rng = np.random.default_rng(0)
    last = None
    for _ in range(20):
        ramps = sorted(rng.choice(8, size=rng.integers(1, 4), replace=False).tolist())
        last = publish(stack, {int(r): float(rng.uniform(0.5, 1.0)) for r in ramps})
        time.sleep(0.1)
    traffic.join()
    assert len(answers) == len(images) and all(a.error is None for a in answers)
    _wait_for(lambda: metric(stack.metrics_url, "apparate_config_version", model=MODEL) == last.version, 1.0)


def test_redis_outage_loses_no_request_and_feedback_resumes(stack: Stack, test_images: np.ndarray) -> None:
    _apply(stack, {EARLY_RAMP: 0.9})
    dropped_before = metric(stack.metrics_url, "apparate_feedback_dropped_total", model=MODEL)
    images = test_images[:900]
    answers: list[Answer] = []
    traffic = _background_traffic(stack, images, 300, answers)
    time.sleep(0.5)
    old = stack.process("redis")
    old.stop()
    time.sleep(1.0)
    stack.processes[stack.processes.index(old)] = start_redis(stack.redis_port, old.log.parent)
    traffic.join()
    assert len(answers) == len(images) and all(a.error is None for a in answers)
    assert metric(stack.metrics_url, "apparate_feedback_dropped_total", model=MODEL) > dropped_before
    client = redis.Redis.from_url(stack.redis_url)
    replay(stack.grpc_url, MODEL, {"IMAGE": images[:64]}, poisson_arrivals(64, 200))
    _wait_for(lambda: client.xlen(RedisKeys(MODEL).feedback) > 0, 10, interval=0.1)
    assert client.get(RedisKeys(MODEL).manifest) is not None  # re-registered after the restart


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a socket listening on ``port``, from the kernel's tables (state 0A is LISTEN; addresses are
    32-bit words in host byte order). An IPv6 socket bound to a v4-mapped address counts as that IPv4 address."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(host)
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed)
            mapped = getattr(address, "ipv4_mapped", None)
            addresses.add(str(mapped or address))
    return addresses


def test_every_triton_endpoint_listens_on_loopback_only(stack: Stack) -> None:
    for port in (stack.ports.http, stack.ports.grpc, stack.ports.metrics):
        assert _listening_addresses(port) == {"127.0.0.1"}, f"port {port} is reachable from other hosts"


def _executions(client: grpcclient.InferenceServerClient) -> int:
    """Batches the entry has run since it loaded (absent from Triton's JSON while 0)."""
    return int(client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0].get("execution_count", 0))


def test_untraced_batches_stop_where_their_last_sample_exits_and_report_nothing(
    stack: Stack, repository: Path, test_images: np.ndarray
) -> None:
    images = test_images[:48]
    ramp = _early_ramp(EarlyExitModel(repository / MODEL / "1"), images)
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="feedback_share must be in"):
            stack.reload(MODEL, {"feedback_share": "2"})
        assert client.is_model_ready(MODEL)  # a refused reload leaves the last good one serving
        stack.reload(MODEL, {"feedback_share": "0.000001"})  # practically no batch traced
        _apply(stack, {EARLY_RAMP: 0.0})  # every sample exits at the ramp
        names = ("apparate_batches_stopped_total", "apparate_feedback_published_total")
        before = {name: metric(stack.metrics_url, name, model=MODEL) for name in names}
        executions = _executions(client)
        answers = replay(stack.grpc_url, MODEL, {"IMAGE": images}, poisson_arrivals(len(images), 200.0))
        assert all(a.error is None for a in answers)
        assert [a.exit for a in answers] == [EARLY_RAMP] * len(images)
        assert [a.label for a in sorted(answers, key=lambda a: a.index)] == ramp.prediction.tolist()
        # Both counts are read again until they match: Triton records a batch in its statistics only after the batch's
        # responses are out, so a count read as the last answer arrives can miss that batch (a clean-clone run did).
        _wait_for(lambda: metric(stack.metrics_url, names[0], model=MODEL) - before[names[0]]
                  == _executions(client) - executions, 5)
        time.sleep(1.0)  # the publisher ships every 250 ms
        assert metric(stack.metrics_url, names[1], model=MODEL) == before[names[1]]
    finally:
        # Every batch traced again (the default; a load without a configuration keeps the last override).
        stack.reload(MODEL, {"feedback_share": "1"})


def test_control_batches_are_served_on_the_fused_graph_and_reported_without_ramps(
    stack: Stack, repository: Path, test_images: np.ndarray
) -> None:
    """With ``control_share`` 1 every traced batch is a control batch: exits on, yet every sample is answered at the
    final layer, and the records (the controller's baseline) name no ramp."""
    images = test_images[:32]
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="control_share must be in"):
            stack.reload(MODEL, {"control_share": "-0.5"})
        assert client.is_model_ready(MODEL)
        stack.reload(MODEL, {"control_share": "1"})
        _apply(stack, {EARLY_RAMP: 0.0})  # every sample would exit at the ramp
        before = metric(stack.metrics_url, "apparate_batches_control_total", model=MODEL)
        stream = redis.Redis.from_url(stack.redis_url)
        last_id = (stream.xrevrange(RedisKeys(MODEL).feedback, count=1) or [(b"0-0", {})])[0][0]
        executions = _executions(client)
        answers = replay(stack.grpc_url, MODEL, {"IMAGE": images}, poisson_arrivals(len(images), 100.0))
        assert all(a.error is None for a in answers)
        final_exit = EarlyExitModel(repository / MODEL / "1").manifest.final_exit
        assert [a.exit for a in answers] == [final_exit] * len(images)
        _wait_for(lambda: metric(stack.metrics_url, "apparate_batches_control_total", model=MODEL) - before
                  == _executions(client) - executions, 5)  # both read again: see the test above

        def recorded() -> list[FeedbackRecord]:
            # Every record since ``last_id``, whatever version it names: a control batch is one whichever
            # configuration it was served under.
            entries = stream.xrange(RedisKeys(MODEL).feedback, min=f"({last_id.decode()}")
            return [FeedbackRecord.decode(fields) for _, fields in entries]

        _wait_for(lambda: sum(r.batch_size for r in recorded()) == len(images), 10, interval=0.1)
        assert all(r.ramps == () for r in recorded())
    finally:
        stack.reload(MODEL, {"control_share": "0"})


def test_traced_batches_answered_at_a_ramp_finish_off_the_request_path_and_report_the_original_answer(
    stack: Stack, repository: Path, test_images: np.ndarray
) -> None:
    """Every batch traced (the default) and every sample exiting at the ramp: the answers leave at the ramp, and each
    batch's deeper blocks run afterwards, so its record still holds the original model's prediction."""
    images = test_images[:40]
    model = EarlyExitModel(repository / MODEL / "1")
    with torch.inference_mode():
        verdicts = list(model.stages({"IMAGE": torch.from_numpy(images)}, [EARLY_RAMP]))
    version = _apply(stack, {EARLY_RAMP: 0.0})
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    names = ("apparate_batches_deferred_total", "apparate_batches_finished_inline_total")
    before = {name: metric(stack.metrics_url, name, model=MODEL) for name in names}
    stream = redis.Redis.from_url(stack.redis_url)
    last_id = (stream.xrevrange(RedisKeys(MODEL).feedback, count=1) or [(b"0-0", {})])[0][0]
    executions = _executions(client)
    answers = replay(stack.grpc_url, MODEL, {"IMAGE": images}, poisson_arrivals(len(images), 100.0))
    assert all(a.error is None for a in answers)
    assert [a.exit for a in answers] == [EARLY_RAMP] * len(images)

    def every_batch_deferred_or_finished() -> bool:
        # Both counts are read until they agree: Triton may count a batch's execution after its answers have left.
        handled = sum(metric(stack.metrics_url, n, model=MODEL) - before[n] for n in names)
        return handled == _executions(client) - executions

    _wait_for(every_batch_deferred_or_finished, 5)
    assert metric(stack.metrics_url, names[0], model=MODEL) > before[names[0]]

    def recorded() -> list[FeedbackRecord]:
        entries = stream.xrange(RedisKeys(MODEL).feedback, min=f"({last_id.decode()}")
        return [r for r in (FeedbackRecord.decode(fields) for _, fields in entries) if r.config_version == version]

    _wait_for(lambda: sum(r.batch_size for r in recorded()) == len(images), 10, interval=0.1)
    records = recorded()
    served = {a.label for a in answers}
    assert served <= set(verdicts[0].prediction.tolist())
    # Each record's final predictions are the original model's for its samples: as a multiset over the replay.
    finals = sorted(int(p) for r in records for p in r.final)
    assert finals == sorted(verdicts[-1].prediction.tolist())
    assert all(r.timing.tail_ms > 0 and (r.exit == EARLY_RAMP).all() for r in records)
