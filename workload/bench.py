"""``make bench``: side-by-side latency benchmark on one server and one trace (paper §5).

Systems, all replaying the same arrival trace of the same inputs against the same Triton server, all asking for the
same four outputs:

- **vanilla**: the ``_vanilla`` entry (same backbone, one block, no ramps): the baseline of every ratio and the source
  of the original model's answers that agreement is measured against;
- **off**: the early-exit entry with every ramp switched off (its fixed cost over vanilla);
- **static EE**: the early-exit entry with the thresholds tuned once at bootstrap (``prepare``) and never changed,
  what a DeeBERT/BranchyNet user gets;
- **hindsight**: static's ramps with the thresholds that save the most on the measured inputs themselves at the
  agreement adaptive served on them (at least the budget's), chosen after the fact from the in-process verdicts:
  the strongest static system with those ramps, out of reach of any live policy (it knows the inputs), and the one
  adaptive is compared with at equal agreement;
- **adaptive**: the same entry with the controller running (threshold tuning, measured-latency ramp-set decisions),
  warmed up on a separate trace of other inputs before the measured trace starts;
- **oracle** (offline): every input exits at the earliest candidate ramp that agrees with the original model, paying
  only that ramp; its saving is estimated from the profiled latencies.

Traces: Poisson and bursty arrivals at a rate set by ``--load``, vanilla's utilisation (the rate divided by its server
time per request when requests come one at a time), plus a drift scenario whose inputs change mid-stream. Saturated
capacity (closed loop; the adaptive system's with the controller live) is reported beside it: a rate set as a share of
that capacity is no measure of load on a CPU, where batches of 32 cost far less per request than the batches of 1-2 a
moderate trace forms (ResNet-56: 25 % of saturated capacity kept the server 70-85 % busy). The Poisson and bursty traces
are cut into ``--rounds`` segments, and each segment is replayed against every system in turn (rotating order): on a
shared machine whose speed drifts by ±10 % over minutes, running whole traces one system after the other measured the
machine as much as the systems. Off and static are served by a twin of the early-exit entry (``<model>_fixed``: the
same files under a second name), so they share one phase, and one set of vanilla segments, with adaptive while the
controller runs on the entry it controls; hindsight, known only once adaptive's agreement is, follows in a second
phase with vanilla segments of its own. The price of interleaving: adaptive's entry idles while the other systems'
segments run, so the load its feedback shows the controller (the busy share) is about a quarter of the trace's, and
probes of switched-off exits, scheduled in seconds, come once per four times as many of its requests as under
continuous traffic. Spread: every median saving is also given per segment (min to max). The controller's own CPU time
and the tuner's cost are reported. Writes ``report.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch

from controller.config_store import publish_config
from controller.guard import AccuracyGuard
from controller.latency import LatencyModel
from controller.model_controller import ControllerSettings
from controller.tuner import ThresholdTuner, TunerSettings, evaluate
from early_exit.exit_config import ExitConfig
from early_exit.exit_rule import NEVER_EXIT
from early_exit.keys import RedisKeys
from early_exit.manifest import Manifest
from early_exit.model_config import vanilla_twin
from early_exit.runtime import EarlyExitModel
from model_zoo.datasets import load_image_set
from workload.client import (
    Answer,
    bursty_arrivals,
    compute_seconds,
    measure_capacity,
    poisson_arrivals,
    replay,
    service_ms,
)
from workload.stack import ROOT, Process, Stack, running_stack
from workload.timeline import ConfigTimeline, record_configs
from workload.tuner_cost import tuning_ms

#: The controller's settings in these runs: its defaults (``ControllerSettings``), the round of fresh samples spelled
#: out.
CONTROLLER_ARGS = ["--min-fresh", "256"]
Inputs = dict[str, np.ndarray]
#: Systems that keep one configuration, served by the twin entry (``fixed_entry``).
FIXED = ("off", "static", "hindsight")


@dataclass
class Run:
    """Answers of one system on one trace, with the configurations seen while it ran."""

    system: str
    trace: str
    answers: list[Answer]
    configs: ConfigTimeline = field(default_factory=list)
    controller_cpu_s: float = 0.0  # while the measured trace ran: the controller's start-up and warm-up excluded
    controller_share: float = 0.0  # of one core, over the same time
    seconds: float = 0.0  # time spent replaying this system's requests (its segments only when interleaved)
    busy_seconds: float = 0.0  # the served entry's compute time (Triton's statistics) over those segments

    def latencies(self) -> np.ndarray:
        return np.array([a.latency_ms for a in self.answers if a.error is None])

    def agreement(self, original: np.ndarray) -> np.ndarray:
        return np.array([a.label == original[a.index] for a in self.answers])

    def throughput(self) -> float:
        return len(self.answers) / max(self.seconds, 1e-9)

    def utilisation(self) -> float:
        return self.busy_seconds / max(self.seconds, 1e-9)


def _take(inputs: Inputs, index: slice | np.ndarray) -> Inputs:
    return {name: array[index] for name, array in inputs.items()}


def fixed_entry(model: str) -> str:
    """The twin of early-exit entry ``model`` that serves the systems with one fixed configuration."""
    return f"{model}_fixed"


def entry(model: str, system: str) -> str:
    """The entry that serves ``system``: the vanilla twin, the controlled entry (adaptive) or the fixed twin."""
    if system == "vanilla":
        return vanilla_twin(model)
    return fixed_entry(model) if system in FIXED else model


@contextlib.contextmanager
def bench_repository(repository: Path, model: str) -> Iterator[Path]:
    """A repository holding ``model``, its vanilla twin and its fixed twin: ``model``'s configuration under the name
    ``fixed_entry(model)`` with its version folders linked, nothing copied. The fixed systems run on the twin, so they
    can share a phase with the controller, which is told to control ``model`` only: it neither tunes on their
    feedback nor overwrites their thresholds."""
    with tempfile.TemporaryDirectory(prefix="bench-repository-") as folder:
        view = Path(folder)
        for name in (model, vanilla_twin(model)):
            (view / name).symlink_to((repository / name).resolve(), target_is_directory=True)
        twin = view / fixed_entry(model)
        twin.mkdir()
        config = (repository / model / "config.pbtxt").read_text(encoding="utf-8")
        renamed = re.sub(r'^name:\s*"[^"]*"', f'name: "{twin.name}"', config, count=1, flags=re.MULTILINE)
        (twin / "config.pbtxt").write_text(renamed, encoding="utf-8")
        for version in (repository / model).resolve().iterdir():
            if version.is_dir():
                (twin / version.name).symlink_to(version, target_is_directory=True)
        yield view


def _set_config(client: redis.Redis, model: str, thresholds: dict[int, float]) -> ExitConfig | None:
    config = publish_config(client, RedisKeys(model), thresholds, writer="bench")
    time.sleep(0.3)  # applied within milliseconds; margin for the next batch boundary
    return config


def serve_as(client: redis.Redis, model: str, system: str, fixed: dict[str, dict[int, float]]) -> None:
    """Before a segment or burst of ``system``: a system with a fixed configuration (``fixed``) shares the fixed
    twin with the others, so its thresholds are set on it each time; vanilla and adaptive keep theirs. (Set once
    before the capacity rounds, the last one set, static's, served the ramps-off bursts too.)"""
    if system in fixed:
        _set_config(client, entry(model, system), fixed[system])


def workload_inputs(dataset: str, data_dir: Path | None, count: int,
                    warm_count: int | None = None) -> tuple[Inputs, Inputs, Inputs, str]:
    """Measured inputs, warm-up inputs (others of the same distribution: ``warm_count`` of them, or as many as
    measured, as far as the data set goes), drifting inputs and the drift's description, as served tensors."""
    warm_count = max(count, warm_count or 0)
    if dataset == "sst2":
        from model_zoo.datasets import load_sst2
        from model_zoo.minilm_sst2 import tokenize

        dev = load_sst2("dev", data_dir) if data_dir else load_sst2("dev")
        train = load_sst2("train", data_dir) if data_dir else load_sst2("train")
        # dev first, then the end of train (the backbone trained on a subset; prepare used the start)
        pool = dev.sentences + train.sentences[-(count + warm_count) :]
        pool = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))]
        measured, warm = pool[:count], pool[count : count + warm_count]
        drifting = sorted(measured, key=len)  # short, easy sentences first; long ones later
        rename = {"input_ids": "INPUT_IDS", "attention_mask": "ATTENTION_MASK"}

        def encode(sentences: list[str]) -> Inputs:
            return {rename[k]: v for k, v in tokenize(sentences).items()}

        return encode(measured), encode(warm), encode(drifting), "sentences ordered short to long"
    test = load_image_set(dataset, "test", data_dir)
    order = np.random.default_rng(0).permutation(len(test))
    count = min(count, len(test) // 2)
    images, warm = test.images[order[:count]], test.images[order[count : count + warm_count]]
    drifting = add_noise(images, 0.5, 60.0)
    return {"IMAGE": images}, {"IMAGE": warm}, {"IMAGE": drifting}, \
        "Gaussian pixel noise growing from 0 to sigma 60 over the second half"


def add_noise(images: np.ndarray, start_fraction: float, max_sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian pixel noise growing linearly from 0 at ``start_fraction`` of the stream to ``max_sigma``."""
    n = len(images)
    sigma = np.clip((np.arange(n) / n - start_fraction) / (1 - start_fraction), 0, 1) * max_sigma
    noise = np.random.default_rng(seed).normal(size=images.shape) * sigma[:, None, None, None]
    return np.clip(images.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _start_controller(stack: Stack, model: str, start: dict[int, float], log_dir: Path) -> Process:
    """The controller, controlling ``model`` only (never its fixed twin), from thresholds ``start`` (static's)."""
    _set_config(redis.Redis.from_url(stack.redis_url), model, start)
    return stack.start_controller(log_dir, [*CONTROLLER_ARGS, "--model", model])


def _start_adaptive(stack: Stack, model: str, start: dict[int, float], warm: Inputs, arrivals: np.ndarray,
                    log_dir: Path) -> Process:
    """Start the controller from ``start`` and let it tune on ``warm`` (other inputs, Poisson at the rate of
    ``arrivals``) before anything is measured."""
    controller = _start_controller(stack, model, start, log_dir)
    count = len(next(iter(warm.values())))
    replay(stack.grpc_url, model, warm, poisson_arrivals(count, len(arrivals) / arrivals[-1], seed=4))
    return controller


def run_system(stack: Stack, system: str, trace: str, model: str, inputs: Inputs, arrivals: np.ndarray,
               static: dict[int, float], warm: Inputs, log_dir: Path) -> Run:
    """Replay one whole trace against one system; ``adaptive`` first runs the controller on ``warm`` at the same
    rate. (The drift scenario: adaptation over the trace is what it measures, so it is not interleaved.)"""
    client = redis.Redis.from_url(stack.redis_url)
    serve_as(client, model, system, {"off": {}, "static": static})
    controller = _start_adaptive(stack, model, static, warm, arrivals, log_dir) if system == "adaptive" else None
    cpu_before, started = controller.cpu_seconds() if controller else 0.0, time.perf_counter()
    answers, configs, seconds, busy = _segment(stack, client, system, model, inputs, arrivals, 0)
    run = Run(system, trace, answers, configs, seconds=seconds, busy_seconds=busy)
    if controller is not None:
        run.controller_cpu_s, run.controller_share = _controller_usage(controller, cpu_before, started)
        controller.stop()
    return run


def _controller_usage(controller: Process, cpu_before: float, started: float) -> tuple[float, float]:
    """CPU seconds the controller used since ``cpu_before`` was read at ``started``, and their share of one core."""
    cpu = controller.cpu_seconds() - cpu_before
    return cpu, cpu / max(time.perf_counter() - started, 1e-9)


def _segment(stack: Stack, client: redis.Redis, system: str, model: str, inputs: Inputs, arrivals: np.ndarray,
             first: int) -> tuple[list[Answer], ConfigTimeline, float, float]:
    """Replay one segment of a trace (requests ``first...``) against one system: its answers, the configurations
    seen, its duration and the served entry's compute seconds over it."""
    name = entry(model, system)
    answers: list[Answer] = []
    worker = threading.Thread(target=replay, args=(stack.grpc_url, name, inputs, arrivals - arrivals[0]),
                              kwargs={"answers": answers})
    busy = compute_seconds(stack.grpc_url, name)
    started = time.perf_counter()
    worker.start()
    configs = record_configs(client, name, worker, interval=0.1)
    seconds = time.perf_counter() - started
    busy = compute_seconds(stack.grpc_url, name) - busy
    for answer in answers:
        answer.index += first
    return answers, configs, seconds, busy


def run_phase(stack: Stack, trace: str, model: str, inputs: Inputs, arrivals: np.ndarray, systems: tuple[str, ...],
              fixed: dict[str, dict[int, float]], warm: Inputs, log_dir: Path, rounds: int) -> dict[str, Run]:
    """Replay ``arrivals`` in ``rounds`` consecutive segments; each segment goes to every one of ``systems`` in turn
    (the order rotating per round), so every system meets the same slow and fast spells of this shared machine and
    each ratio pairs answers to the same requests measured minutes apart at most. ``fixed`` holds the thresholds of
    the systems that keep one configuration (served by the fixed twin); with ``adaptive`` among ``systems`` the
    controller runs through the phase on the controlled entry, starting from static's thresholds."""
    client = redis.Redis.from_url(stack.redis_url)
    controller = None
    if "adaptive" in systems:
        controller = _start_adaptive(stack, model, fixed["static"], warm, arrivals, log_dir)
    cpu_before, started = controller.cpu_seconds() if controller else 0.0, time.perf_counter()
    measured = {system: Run(system, trace, []) for system in systems}
    for k, index in enumerate(np.array_split(np.arange(len(arrivals)), rounds)):
        for system in systems[k % len(systems):] + systems[: k % len(systems)]:
            serve_as(client, model, system, fixed)
            answers, configs, seconds, busy = _segment(stack, client, system, model, _take(inputs, index),
                                                       arrivals[index], int(index[0]))
            run = measured[system]
            run.answers += answers
            run.configs += [c for c in configs if not run.configs or c[1] != run.configs[-1][1]]
            run.seconds += seconds
            run.busy_seconds += busy
    if controller is not None:
        adaptive = measured["adaptive"]
        adaptive.controller_cpu_s, adaptive.controller_share = _controller_usage(controller, cpu_before, started)
        controller.stop()
    return measured


def run_interleaved(stack: Stack, trace: str, model: str, inputs: Inputs, arrivals: np.ndarray,
                    static: dict[int, float], hindsight_at: Callable[[float], dict[int, float]], warm: Inputs,
                    log_dir: Path, rounds: int) -> tuple[dict[str, Run], dict[str, Run], dict[int, float]]:
    """Every system on one trace, in two phases with their own vanilla segments: vanilla, off, static and adaptive
    with the controller running (off and static on the fixed twin), then vanilla and hindsight, whose thresholds are
    ``hindsight_at`` adaptive's served agreement, so the two are compared at equal agreement. Returns each system's
    run, the vanilla run of its phase (its baseline) and hindsight's thresholds."""
    runs = run_phase(stack, trace, model, inputs, arrivals, ("vanilla", "off", "static", "adaptive"),
                     {"off": {}, "static": static}, warm, log_dir, rounds)
    original = np.array([a.label for a in runs["vanilla"].answers])
    hindsight = hindsight_at(float(runs["adaptive"].agreement(original).mean()))
    phase = run_phase(stack, trace, model, inputs, arrivals, ("vanilla", "hindsight"), {"hindsight": hindsight},
                      warm, log_dir, rounds)
    baselines = {system: runs["vanilla"] for system in runs}
    runs["hindsight"], baselines["hindsight"] = phase["hindsight"], phase["vanilla"]
    return runs, baselines, hindsight


@torch.inference_mode()
def offline_verdicts(served: EarlyExitModel, inputs: Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence and prediction of every candidate ramp ``[R, N]`` and the final prediction ``[N]``."""
    every = list(range(len(served.manifest.ramps)))
    confidence, prediction, final = [], [], []
    total = len(next(iter(inputs.values())))
    for start in range(0, total, 250):
        batch = {k: torch.from_numpy(v) for k, v in _take(inputs, slice(start, start + 250)).items()}
        verdicts = list(served.stages(batch, every))
        confidence.append(np.stack([v.confidence for v in verdicts[:-1]]))
        prediction.append(np.stack([v.prediction for v in verdicts[:-1]]))
        final.append(verdicts[-1].prediction)
    return np.concatenate(confidence, 1), np.concatenate(prediction, 1), np.concatenate(final)


def oracle_saving(latency: LatencyModel, prediction: np.ndarray, final: np.ndarray) -> float:
    """Estimated saving (fraction of vanilla latency) when every input exits at its earliest agreeing ramp."""
    agree = np.vstack([prediction == final[None, :], np.ones((1, len(final)), dtype=bool)])
    first = agree.argmax(axis=0)
    cumulative = np.append(np.cumsum(latency.block_ms)[latency.ramp_after_block] + latency.ramp_ms, latency.vanilla_ms)
    return float(1 - cumulative[first].mean() / latency.vanilla_ms)


def best_thresholds(confidence: np.ndarray, prediction: np.ndarray, final: np.ndarray, latency: LatencyModel,
                    candidates: list[int], floor: float = AccuracyGuard().floor) -> dict[int, float]:
    """The thresholds of ``candidates`` (candidate ramp indices) that save the most for exactly these inputs at
    agreement ``floor`` or better (point estimate: chosen in hindsight), keeping only the ramps that then exit, so
    that only their cost is paid; ``{}`` when none can exit."""
    tuner = ThresholdTuner(TunerSettings(guard=AccuracyGuard(budget=1.0 - floor, z=0.0)))
    active = sorted(candidates)
    while active:  # re-tune without the ramps that exit nothing, whose cost no longer counts, until all of them exit
        thresholds = tuner.tune(confidence[active], prediction[active], final, latency.exit_latencies(active))
        kept = [r for r, t in zip(active, thresholds) if t < NEVER_EXIT]
        if kept == active:
            return {r: float(t) for r, t in zip(active, thresholds)}
        active = kept
    return {}


def budget_bound(confidence: np.ndarray, prediction: np.ndarray, final: np.ndarray,
                 latency: LatencyModel) -> tuple[float, float]:
    """Modelled mean saving (fraction of vanilla latency) of the best thresholds for exactly these inputs within the
    budget, every candidate ramp considered: a ceiling no threshold policy can pass with these ramps, unlike the
    oracle, which ignores confidence and the budget; and the median request's saving under the same thresholds,
    since the targets are medians and a mean can come from a minority of inputs exiting very early."""
    best = best_thresholds(confidence, prediction, final, latency, list(range(confidence.shape[0])))
    if not best:
        return 0.0, 0.0
    active = list(best)
    outcome = evaluate(np.array(list(best.values())), confidence[active], prediction[active] == final[None, :],
                       latency.exit_latencies(active))
    return outcome.saving_ms / latency.vanilla_ms, outcome.median_saving_ms / latency.vanilla_ms


def measure_capacities(stack: Stack, model: str, sample: Inputs, static: dict[int, float], rounds: int,
                       log_dir: Path) -> dict[str, list[float]]:
    """Saturated bursts of ``sample``, ``rounds`` times round-robin in rotating order (one burst is noisy on shared
    cores: single rounds of one path spread by 20-30 points, so each system takes every position in turn): vanilla,
    off and static (on the fixed twin, set to each one's thresholds before its bursts), and adaptive: the controller
    runs through the bursts, starting from static's thresholds after two unmeasured rounds to settle, and decides for
    itself whether exits pay at saturation. The two unmeasured rounds also give every entry its first batches of the
    bursts' sizes, which run slower."""
    client = redis.Redis.from_url(stack.redis_url)
    fixed = {"off": {}, "static": static}
    controller = _start_controller(stack, model, static, log_dir)
    systems = ("vanilla", *fixed, "adaptive")
    capacity: dict[str, list[float]] = {system: [] for system in systems}
    for k in range(-2, rounds):
        for system in systems[k % len(systems):] + systems[: k % len(systems)]:
            serve_as(client, model, system, fixed)
            burst = measure_capacity(stack.grpc_url, entry(model, system), sample)
            if k >= 0:
                capacity[system].append(burst)
    controller.stop()
    return capacity


def burst_inputs(url: str, model: str, inputs: Inputs, seconds: float = 3.0) -> Inputs:
    """``inputs``, repeated as needed for a saturated burst to keep ``model`` busy about ``seconds``, judged by one
    unmeasured burst: a burst of a fixed 1,000 requests lasts one second on the CIFAR ResNet-20, where the client's
    own sending and the machine's spells moved single ratios by -33..+42 %."""
    count = max(len(next(iter(inputs.values()))), round(seconds * measure_capacity(url, model, inputs)))
    return {name: np.resize(array, (count, *array.shape[1:])) for name, array in inputs.items()}


def capacity_summary(capacity: dict[str, list[float]]) -> str:
    """Median requests per second of each system's bursts, and the median and range of its ratio to the vanilla
    burst of the same round (a burst takes seconds, so a round's systems meet the same spell of the machine)."""
    vanilla = np.array(capacity["vanilla"])
    parts = []
    for name, values in capacity.items():
        ratio = np.array(values) / vanilla - 1
        parts.append(f"{name} {np.median(values):.0f} req/s ({np.median(ratio):+.1%}, "
                     f"{ratio.min():+.0%}..{ratio.max():+.0%})")
    return ", ".join(parts)


def windowed(values: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def segment_medians(run: Run, count: int, rounds: int) -> np.ndarray:
    """Median latency of ``run``'s answers in each of the trace's ``rounds`` segments (requests ``0...count`` cut as
    ``run_phase`` replays them), by request index, so that two systems' figures pair the same requests."""
    latency = {a.index: a.latency_ms for a in run.answers if a.error is None}
    return np.array([np.median([latency[i] for i in segment if i in latency])
                     for segment in np.array_split(np.arange(count), rounds)])


def round_savings(run: Run, vanilla: Run, count: int, rounds: int) -> tuple[float, float]:
    """Min and max median saving over the trace's ``rounds`` segments, each against vanilla's answers to the same
    segment."""
    savings = 1 - segment_medians(run, count, rounds) / segment_medians(vanilla, count, rounds)
    return float(savings.min()), float(savings.max())


@dataclass(frozen=True)
class Paired:
    """System *a* against system *b*, served the same requests in the same phase.

    ``saving`` holds, per segment, *a*'s median saving minus *b*'s (fractions of that segment's vanilla median);
    ``agreement`` is the mean over the paired requests of *a*'s agreement with the original model minus *b*'s, with
    its standard error. Why paired: a whole-trace comparison of two savings carries the machine's drift between
    segments (their savings range over 20-60 points on this machine), where the difference within a segment, both
    systems having answered the same requests minutes apart, does not.
    """

    saving: np.ndarray
    agreement: float
    agreement_se: float

    def describe(self, a: str, b: str) -> str:
        mean, se = float(self.saving.mean()), float(self.saving.std(ddof=1) / np.sqrt(len(self.saving)))
        ahead = int((self.saving > 0).sum())
        return (f"{a} against {b}, segment by segment on the same requests: median saving {100 * mean:+.1f} points "
                f"(mean over {len(self.saving)} segments, standard error {100 * se:.1f}; {a} ahead in {ahead}), "
                f"agreement with the original {100 * self.agreement:+.2f} points (standard error "
                f"{100 * self.agreement_se:.2f}, paired answers).")


def paired_difference(a: Run, b: Run, vanilla: Run, original: np.ndarray, rounds: int) -> Paired:
    """``Paired`` figures of ``a`` against ``b``, both in ``vanilla``'s phase; ``original`` holds the original model's
    answer to every request of the trace."""
    count = len(original)
    base = segment_medians(vanilla, count, rounds)
    saving = (segment_medians(b, count, rounds) - segment_medians(a, count, rounds)) / base
    agree_b = {x.index: x.label == original[x.index] for x in b.answers}
    diff = np.array([float(x.label == original[x.index]) - agree_b[x.index] for x in a.answers if x.index in agree_b])
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return Paired(saving, float(diff.mean()) if len(diff) else float("nan"), se)


def rounds_agreement(run: Run, original: np.ndarray) -> tuple[int, int, float]:
    """Configurations published during the run, how many of them served ≥ 20 answers below 99 % agreement with the
    original model (out of sample: answers served after the configuration was chosen), and the lowest agreement."""
    starts = [t for t, _, _ in run.configs]
    if not starts:
        return 0, 0, float("nan")
    bounds = [*starts[1:], np.inf]
    below, lowest = 0, 1.0
    for start, end in zip(starts, bounds):
        served = [a.label == original[a.index] for a in run.answers if start <= a.sent < end]
        if len(served) >= 20:
            agreement = float(np.mean(served))
            lowest = min(lowest, agreement)
            below += agreement < 0.99
    return len(starts) - 1, below, lowest


def recovery_rounds(run: Run, original: np.ndarray, shift_index: int) -> int | None:
    """Configurations published after the input shift (request ``shift_index``) until one serves ≥ 99 % agreement
    with the original model (0: it never fell below; ``None``: it never recovered within the run)."""
    shift = run.answers[shift_index].sent
    starts = [t for t, _, _ in run.configs if t >= shift]
    windows = list(zip([shift, *starts], [*starts, np.inf]))
    for rounds, (start, end) in enumerate(windows):
        served = [a.label == original[a.index] for a in run.answers if start <= a.sent < end]
        if len(served) >= 20 and np.mean(served) >= 0.99:
            return rounds
    return None


def _rounded(thresholds: dict[int, float]) -> dict[int, float]:
    return {ramp: round(threshold, 4) for ramp, threshold in thresholds.items()}


def _row(run: Run, original: np.ndarray, vanilla: Run, rounds: int) -> str:
    lat, base = run.latencies(), vanilla.latencies()
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    v50, v99 = np.percentile(base, [50, 99])
    low, high = round_savings(run, vanilla, len(original), rounds)
    errors = sum(a.error is not None for a in run.answers)
    return (f"| {run.trace} | {run.system} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {1 - p50 / v50:+.1%} "
            f"({low:+.0%}..{high:+.0%}) | {p99 / v99 - 1:+.1%} | {run.agreement(original).mean():.2%} | "
            f"{run.throughput():.0f} | {run.utilisation():.0%} | {errors} |")


def plot(runs: dict[tuple[str, str], Run], drift: dict[str, Run], original_drift: np.ndarray, final_exit: int,
         out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    traces = sorted({trace for trace, _ in runs})
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for axis, trace in zip(axes[0], traces):
        for (t, system), run in runs.items():
            if t == trace:
                lat = np.sort(run.latencies())
                axis.plot(lat, np.linspace(0, 1, len(lat)), label=system)
        axis.set(title=f"latency CDF, {trace}", xlabel="latency (ms)", ylabel="fraction of requests")
        axis.set_xscale("log")
        axis.legend()
    paths.append(out / "latency_cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for system, run in drift.items():
        if system == "vanilla":
            continue
        sent = np.array([a.sent for a in run.answers])
        origin = sent[0]
        agree = run.agreement(original_drift).astype(float)
        exited = np.array([a.exit < final_exit for a in run.answers], dtype=float)
        width = min(300, len(sent) // 5)
        axes[0].plot(sent[width - 1 :] - origin, 1 - windowed(agree, width), label=system)
        axes[1].plot(sent[width - 1 :] - origin, windowed(exited, width), label=system)
        if system == "adaptive" and run.configs:
            times = [max(t - origin, 0.0) for t, _, _ in run.configs] + [sent[-1] - origin]
            for ramp in sorted({r for _, _, th in run.configs for r in th}):
                values = [th.get(ramp, np.nan) for _, _, th in run.configs]
                axes[2].step(times, [*values, values[-1]], where="post", label=f"ramp {ramp}")
    axes[0].axhline(0.01, color="grey", linestyle="--", label="budget")
    axes[0].set(ylabel="windowed accuracy loss")
    axes[1].set(ylabel="windowed exit rate")
    axes[2].set(ylabel="adaptive thresholds",
                xlabel="time (s) since the trace started; inputs drift in its second half")
    for axis in axes:
        axis.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "drift_timeline.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _feedback_mode(share: str | None) -> str:
    if share is None:
        return "the early-exit entry's feedback_share as configured (reference entries: every batch runs to the end)"
    if float(share) >= 1:
        return "every batch runs to the end"
    return (f"{float(share):.0%} of the early-exit entry's batches, drawn at random, run to the end and are reported; "
            f"the others stop where their last sample exits (feedback_share {share})")


def report(args: argparse.Namespace, manifest: Manifest, rate: float, service: float, count: int,
           capacity: dict[str, list[float]],
           runs: dict[tuple[str, str], Run], baselines: dict[tuple[str, str], Run], drift: dict[str, Run],
           drift_description: str, hindsight: dict[str, dict[int, float]], oracle: float, bound: tuple[float, float],
           tuning: tuple[int, int, float, float], paths: list[Path]) -> str:
    originals = {trace: np.array([a.label for a in runs[trace, "vanilla"].answers]) for trace, _ in runs}
    original_drift = np.array([a.label for a in drift["vanilla"].answers])
    lines = [
        f"# Benchmark: {args.model} ({count} requests per run, {rate:.0f} req/s = {args.load:.0%} load)\n",
        f"Feedback: {_feedback_mode(args.feedback_share)}.\n",
        f"Load is utilisation: vanilla takes {service:.2f} ms of server time per request when requests come one at "
        f"a time, so {rate:.0f} req/s keeps it busy {args.load:.0%} of the time without batching; *busy* below is "
        "the share each system's instance actually spent computing (Triton's statistics).\n",
        f"Saturated capacity (closed loop, all requests at once, batches up to the entry's maximum; median of "
        f"{len(capacity['vanilla'])} rounds, each system's ratio to vanilla's burst of the same round, range over the "
        f"rounds in brackets; the controller live on adaptive's entry throughout, started from static's thresholds "
        f"two unmeasured rounds before): {capacity_summary(capacity)}; {rate:.0f} req/s is "
        f"{rate / np.median(capacity['vanilla']):.0%} of vanilla's.\n",
        f"The trace is replayed in {args.rounds} segments; each segment goes to every system in turn, the order "
        "rotating per round: vanilla, off, static and adaptive with the controller running (warmed up first on other "
        "inputs; off and static on a twin of the entry that the controller does not touch), then vanilla and "
        "hindsight. Median saving and p99 change are ratios against vanilla's answers to the same requests in the "
        "same phase; in brackets the range of the median saving over the segments.\n",
        "Hindsight serves static's ramps with the thresholds that save the most on these very inputs at the "
        "agreement adaptive served on them (at least the budget's), chosen after the fact from the in-process "
        "verdicts, out of reach of any live policy: "
        + "; ".join(f"{trace} {_rounded(chosen) if chosen else 'no exit (none reaches that agreement)'}"
                    for trace, chosen in hindsight.items())
        + f". Static serves {_rounded(dict(manifest.initial_thresholds))}.\n",
        "| trace | system | median ms | p95 ms | p99 ms | median saving | p99 vs vanilla | agreement with original "
        "| throughput req/s | busy | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (trace, system), run in runs.items():
        lines.append(_row(run, originals[trace], baselines[trace, system], args.rounds))
    lines.append("")
    for trace in originals:
        paired = paired_difference(runs[trace, "adaptive"], runs[trace, "static"], runs[trace, "vanilla"],
                                   originals[trace], args.rounds)
        lines.append(f"{trace}: {paired.describe('adaptive', 'static')}\n")
    lines += ["", "## Adaptive: controller and configurations", "",
              "The controller's CPU is counted while the measured trace ran (its start-up and warm-up excluded).", "",
              "| trace | configurations published | rounds below 99 % served agreement | lowest round | controller "
              "CPU s | controller CPU share of one core |", "|---|---:|---:|---:|---:|---:|"]
    for (trace, system), run in [*runs.items(), (("drift", "adaptive"), drift["adaptive"])]:
        if system != "adaptive":
            continue
        original = original_drift if trace == "drift" else originals[trace]
        published, below, lowest = rounds_agreement(run, original)
        lines.append(f"| {trace} | {published} | {below} | {lowest:.2%} | {run.controller_cpu_s:.1f} | "
                     f"{run.controller_share:.1%} |")
    last = runs["poisson", "adaptive"].configs
    lines += ["", f"Last adaptive (poisson) configuration: {_rounded(last[-1][2]) if last else '-'}", "",
              f"Threshold tuning on the measured feedback ({tuning[0]} ramps x {tuning[1]:,} samples, the "
              f"controller's window or all of the inputs when fewer, every candidate active): {tuning[2]:.1f} ms "
              f"from scratch, {tuning[3]:.1f} ms from the tuned thresholds.", "",
              f"Oracle (every input at its earliest agreeing ramp, profiled latencies): {oracle:.1%} saving. "
              f"Within the budget (the thresholds that save the most on average for these very inputs at ≥ "
              f"{AccuracyGuard().floor:.0%} agreement, profiled latencies): {bound[0]:.1%} mean saving, the ceiling "
              f"of any threshold policy with these ramps; the median request saves {bound[1]:.1%} under them.",
              ""]
    lines += [f"## Drift ({drift_description})", "",
              "| system | loss first half | loss second half | loss last quarter | exit rate first half | exit rate "
              "second half | median ms first half | median ms second half |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    half, quarter = count // 2, 3 * count // 4
    for system in ("vanilla", "static", "adaptive"):
        run = drift[system]
        agree = run.agreement(original_drift)
        exited = np.array([a.exit < manifest.final_exit for a in run.answers])
        rates = "- | -" if system == "vanilla" else f"{exited[:half].mean():.1%} | {exited[half:].mean():.1%}"
        lat = run.latencies()
        lines.append(f"| {system} | {1 - agree[:half].mean():.2%} | {1 - agree[half:].mean():.2%} | "
                     f"{1 - agree[quarter:].mean():.2%} | {rates} | "
                     f"{np.median(lat[:half]):.2f} | {np.median(lat[half:]):.2f} |")
    recovered = recovery_rounds(drift["adaptive"], original_drift, half)
    lines += ["", "Adaptive after the shift: " + ("never back to 99 % agreement within the run" if recovered is None
              else f"back to ≥ 99 % served agreement after {recovered} configuration change(s)"), ""]
    lines += [*[f"![{p.stem}]({p.name})" for p in paths]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10_resnet")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--requests", type=int, default=4000, help="requests per measured run")
    parser.add_argument("--warmup", type=int, default=ControllerSettings.window,
                        help="feedback samples the controller gets before measuring (default: its window, so the "
                        "measured trace meets its steady state): requests divided by the --feedback-share, on inputs "
                        "of their own as far as the data set has them, then cycling through them")
    parser.add_argument("--load", type=float, default=0.25,
                        help="vanilla's utilisation at one request at a time: the arrival rate is load divided by "
                        "its server time per request")
    parser.add_argument("--traces", default="poisson,bursty", help="comma-separated subset of poisson,bursty")
    parser.add_argument("--rounds", type=int, default=8,
                        help="segments each trace is cut into and replayed against the systems in turn")
    parser.add_argument("--feedback-share", default=None, metavar="SHARE",
                        help="serve the early-exit entry with this feedback_share (share of batches traced to the "
                        "final layer; the others stop where their last sample exits); default: as configured")
    parser.add_argument("--capacity-rounds", type=int, default=12,
                        help="rounds of saturated bursts (vanilla, off, static and adaptive back to back in rotating "
                        "order, the controller live) for the capacity figures")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args(argv)
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    traced = 1.0 if args.feedback_share is None else min(float(args.feedback_share), 1.0)
    warm_requests = round(args.warmup / traced)
    inputs, warm, drift_inputs, drift_description = workload_inputs(args.dataset, args.data_dir, args.requests,
                                                                    warm_requests)
    count = len(next(iter(inputs.values())))
    warm = {name: np.resize(array, (warm_requests, *array.shape[1:])) for name, array in warm.items()}
    log_dir = out / "logs"
    served = EarlyExitModel(args.repository / args.model / "1")
    manifest = served.manifest
    static = dict(manifest.initial_thresholds)
    confidence, prediction, final = offline_verdicts(served, inputs)
    latency = LatencyModel.from_manifest(manifest, 8.0)

    def hindsight_at(agreement: float) -> dict[int, float]:
        floor = max(agreement, AccuracyGuard().floor)
        return best_thresholds(confidence, prediction, final, latency, list(static), floor)

    hindsight: dict[str, dict[int, float]] = {}
    runs: dict[tuple[str, str], Run] = {}
    baselines: dict[tuple[str, str], Run] = {}
    drift: dict[str, Run] = {}
    entries = [entry(args.model, system) for system in ("vanilla", "adaptive", "static")]
    with bench_repository(args.repository, args.model) as repository, \
            running_stack(repository, models=entries, with_controller=False, log_dir=log_dir) as stack:
        if args.feedback_share is not None:
            for name in entries[1:]:
                stack.reload(name, {"feedback_share": args.feedback_share})
        for name in entries:  # first batches of each size run slower: not measured
            replay(stack.grpc_url, name, _take(inputs, slice(0, 300)), poisson_arrivals(300, 50))
        sample = burst_inputs(stack.grpc_url, entries[0], _take(inputs, slice(0, 1000)))
        capacity = measure_capacities(stack, args.model, sample, static, args.capacity_rounds, log_dir)
        service = service_ms(stack.grpc_url, entries[0], _take(inputs, slice(0, 200)))
        rate = args.load * 1000.0 / service
        print(f"capacity: {capacity_summary(capacity)}; vanilla service {service:.2f} ms; replaying at {rate:.0f} "
              "req/s", flush=True)
        makers = {"poisson": lambda: poisson_arrivals(count, rate, seed=1),
                  "bursty": lambda: bursty_arrivals(count, rate, seed=2)}
        for trace in args.traces.split(","):
            measured, paired, hindsight[trace] = run_interleaved(stack, trace, args.model, inputs, makers[trace](),
                                                                 static, hindsight_at, warm, log_dir, args.rounds)
            for system, run in measured.items():
                runs[trace, system], baselines[trace, system] = run, paired[system]
                print(f"  {trace:8s} {system:9s} median {np.median(run.latencies()):.2f} ms "
                      f"(its vanilla {np.median(paired[system].latencies()):.2f} ms)", flush=True)
        arrivals = poisson_arrivals(count, rate, seed=3)
        for system in ("vanilla", "static", "adaptive"):
            drift[system] = run_system(stack, system, "drift", args.model, drift_inputs, arrivals, static, warm,
                                       log_dir)
            print(f"  drift    {system:9s} median {np.median(drift[system].latencies()):.2f} ms", flush=True)

    every_ramp = list(range(confidence.shape[0]))
    window = min(ControllerSettings.window, len(final))
    tuning = (len(every_ramp), window, *tuning_ms(confidence[:, :window], prediction[:, :window], final[:window],
                                                  latency.exit_latencies(every_ramp)))
    original_drift = np.array([a.label for a in drift["vanilla"].answers])
    paths = plot(runs, drift, original_drift, manifest.final_exit, out)
    text = report(args, manifest, rate, service, count, capacity, runs, baselines, drift,
                  drift_description, hindsight, oracle_saving(latency, prediction, final),
                  budget_bound(confidence, prediction, final, latency), tuning, paths)
    (out / "report.md").write_text(text, encoding="utf-8")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
