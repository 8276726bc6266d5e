"""``make bench``: side-by-side latency benchmark on one server and one trace (paper §5).

Systems, all replaying the same arrival trace of the same inputs against the same Triton server:

- **vanilla**: the ``_vanilla`` entry (same backbone, one block, no ramps): the baseline and the source of the
  original model's answers that accuracy is measured against;
- **static EE**: the early-exit entry with the thresholds tuned once at bootstrap (``prepare``) and never changed,
  what a DeeBERT/BranchyNet user gets;
- **adaptive**: the same entry with the controller running (threshold tuning and ramp adjustment);
- **oracle** (offline): every input exits at the earliest candidate ramp that agrees with the original model, paying
  only that ramp; its saving is estimated from the profiled latencies, as is adaptive's for comparison.

Traces: Poisson and bursty arrivals at a rate set relative to the vanilla model's measured capacity, plus a drift
scenario whose inputs get noisier mid-stream. Writes ``report.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch

from controller.config_store import read_config, write_config
from controller.latency import LatencyModel
from early_exit.exit_config import ExitConfig
from early_exit.keys import RedisKeys
from early_exit.runtime import EarlyExitModel
from model_zoo.datasets import load_image_set
from workload.client import Answer, bursty_arrivals, measure_capacity, poisson_arrivals, replay
from workload.stack import ROOT, Stack, running_stack, start_controller
from workload.timeline import ConfigTimeline, record_configs

CONTROLLER_ARGS = ["--min-fresh", "256", "--window", "2000"]


@dataclass
class Run:
    """Answers of one system on one trace, with the configurations seen while it ran."""

    system: str
    trace: str
    answers: list[Answer]
    configs: ConfigTimeline = field(default_factory=list)

    def latencies(self) -> np.ndarray:
        return np.array([a.latency_ms for a in self.answers if a.error is None])

    def accuracy(self, original: np.ndarray) -> float:
        return float(np.mean([a.label == original[a.index] for a in self.answers]))

    def throughput(self) -> float:
        start = min(a.sent for a in self.answers)
        end = max(a.done for a in self.answers)
        return len(self.answers) / (end - start)


def _set_config(client: redis.Redis, model: str, thresholds: dict[int, float]) -> ExitConfig:
    keys = RedisKeys(model)
    current = read_config(client, keys)
    config = ExitConfig(model, (current.version if current else 0) + 1, thresholds, writer="bench")
    write_config(client, keys, config)
    time.sleep(0.3)  # applied within milliseconds; margin for the next batch boundary
    return config


Inputs = dict[str, np.ndarray]


def _take(inputs: Inputs, index: slice | np.ndarray) -> Inputs:
    return {name: array[index] for name, array in inputs.items()}


def workload_inputs(dataset: str, data_dir: Path | None, count: int) -> tuple[Inputs, Inputs, str]:
    """Steady-state inputs, drifting inputs and a description of the drift, as served tensors."""
    if dataset == "sst2":
        from model_zoo.datasets import load_sst2
        from model_zoo.minilm_sst2 import tokenize

        dev = load_sst2("dev", data_dir) if data_dir else load_sst2("dev")
        train = load_sst2("train", data_dir) if data_dir else load_sst2("train")
        sentences = dev.sentences + train.sentences[-max(0, count - len(dev.sentences)) :]
        sentences = [sentences[i] for i in np.random.default_rng(0).permutation(len(sentences))][:count]
        drifting = sorted(sentences, key=len)  # short, easy sentences first; long ones later
        rename = {"input_ids": "INPUT_IDS", "attention_mask": "ATTENTION_MASK"}
        steady = {rename[k]: v for k, v in tokenize(sentences).items()}
        return steady, {rename[k]: v for k, v in tokenize(drifting).items()}, "sentences ordered short to long"
    test = load_image_set(dataset, "test", data_dir)
    order = np.random.default_rng(0).permutation(len(test))
    count = min(count, len(test))
    images = test.images[order[:count]]
    later = test.images[order[-count:]] if len(test) >= 2 * count else images
    return {"IMAGE": images}, {"IMAGE": add_noise(later, 0.5, 60.0)}, \
        "Gaussian pixel noise growing from 0 to sigma 60 over the second half"


def run_system(stack: Stack, system: str, trace: str, model: str, inputs: Inputs, arrivals: np.ndarray,
               log_dir: Path) -> Run:
    client = redis.Redis.from_url(stack.redis_url)
    answers: list[Answer] = []
    controller = start_controller(stack.redis_url, log_dir, CONTROLLER_ARGS) if system == "adaptive" else None
    name = f"{model}_vanilla" if system == "vanilla" else model
    outputs = ("LABEL",) if system == "vanilla" else ("LABEL", "EXIT", "CONFIDENCE")
    worker = threading.Thread(target=replay, args=(stack.grpc_url, name, inputs, arrivals),
                              kwargs={"outputs": outputs, "answers": answers})
    worker.start()
    configs = record_configs(client, model, worker, interval=0.1)
    if controller is not None:
        controller.stop()
    return Run(system, trace, answers, configs)


@torch.inference_mode()
def oracle_saving(repository: Path, model: str, inputs: Inputs, batch_size: float) -> tuple[float, np.ndarray]:
    """Estimated saving (fraction of vanilla latency) of the oracle, and each sample's earliest agreeing ramp."""
    served = EarlyExitModel(repository / model / "1")
    latency = LatencyModel.from_manifest(served.manifest, batch_size)
    every = list(range(len(served.manifest.ramps)))
    earliest = []
    total = len(next(iter(inputs.values())))
    for start in range(0, total, 500):
        batch = {k: torch.from_numpy(v) for k, v in _take(inputs, slice(start, start + 500)).items()}
        verdicts = list(served.stages(batch, every))
        agree = np.stack([v.prediction == verdicts[-1].prediction for v in verdicts[:-1]] + [np.ones_like(
            verdicts[-1].prediction, dtype=bool)])
        earliest.append(agree.argmax(axis=0))
    first = np.concatenate(earliest)
    cumulative = np.append(np.cumsum(latency.block_ms)[latency.ramp_after_block] + latency.ramp_ms, latency.vanilla_ms)
    return float(1 - cumulative[first].mean() / latency.vanilla_ms), first


def estimated_saving(repository: Path, model: str, run: Run, batch_size: float) -> float:
    """Saving (fraction of vanilla latency) the latency model attributes to a run's actual exits."""
    served_manifest = EarlyExitModel(repository / model / "1").manifest
    latency = LatencyModel.from_manifest(served_manifest, batch_size)
    savings = []
    for (start, _, thresholds), nxt in zip(run.configs, [*run.configs[1:], (np.inf, 0, {})]):
        active = sorted(thresholds)
        exit_ms = latency.exit_latencies(active)
        for answer in run.answers:
            if start <= answer.sent < nxt[0]:
                position = active.index(answer.exit) if answer.exit in active else len(active)
                savings.append(latency.vanilla_ms - exit_ms[position])
    return float(np.mean(savings) / latency.vanilla_ms) if savings else 0.0


def add_noise(images: np.ndarray, start_fraction: float, max_sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian pixel noise growing linearly from 0 at ``start_fraction`` of the stream to ``max_sigma``."""
    n = len(images)
    sigma = np.clip((np.arange(n) / n - start_fraction) / (1 - start_fraction), 0, 1) * max_sigma
    noise = np.random.default_rng(seed).normal(size=images.shape) * sigma[:, None, None, None]
    return np.clip(images.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def windowed(values: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def _row(run: Run, original: np.ndarray, vanilla: Run, extra: str = "") -> str:
    lat = run.latencies()
    v_median = float(np.median(vanilla.latencies()))
    p25, p50, p95, p99 = np.percentile(lat, [25, 50, 95, 99])
    errors = sum(a.error is not None for a in run.answers)
    return (f"| {run.trace} | {run.system} | {p50:.2f} | {p25:.2f} | {p95:.2f} | {p99:.2f} | "
            f"{1 - p50 / v_median:+.1%} | {run.accuracy(original):.2%} | {run.throughput():.0f} | {errors} |{extra}")


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
        t = sent - sent[0]
        agree = np.array([a.label == original_drift[a.index] for a in run.answers], dtype=float)
        exited = np.array([a.exit < final_exit for a in run.answers], dtype=float)
        width = 300
        axes[0].plot(t[width - 1 :], 1 - windowed(agree, width), label=system)
        axes[1].plot(t[width - 1 :], windowed(exited, width), label=system)
        if system == "adaptive" and run.configs:
            for ramp in sorted({r for _, _, th in run.configs for r in th}):
                times = [c[0] - sent[0] for c in run.configs]
                axes[2].step(times, [c[2].get(ramp, np.nan) for c in run.configs], where="post", label=f"ramp {ramp}")
    axes[0].axhline(0.01, color="grey", linestyle="--", label="budget")
    axes[0].set(ylabel="windowed accuracy loss")
    axes[1].set(ylabel="windowed exit rate")
    axes[2].set(ylabel="adaptive thresholds", xlabel="time (s); inputs drift in the second half")
    for axis in axes:
        axis.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "drift_timeline.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10_resnet")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--load", type=float, default=0.5, help="arrival rate as a fraction of vanilla capacity")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args(argv)
    args.out = args.out / args.model
    args.out.mkdir(parents=True, exist_ok=True)
    inputs, drift_inputs, drift_description = workload_inputs(args.dataset, args.data_dir, args.requests)
    count = len(next(iter(inputs.values())))
    log_dir = args.out / "logs"
    runs: dict[tuple[str, str], Run] = {}
    drift: dict[str, Run] = {}
    with running_stack(args.repository, models=[args.model, f"{args.model}_vanilla"], with_controller=False,
                       log_dir=log_dir) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        manifest = EarlyExitModel(args.repository / args.model / "1").manifest
        static = dict(manifest.initial_thresholds)
        _set_config(client, args.model, static)
        warm = _take(inputs, slice(0, 300))
        for name in (f"{args.model}_vanilla", args.model):
            replay(stack.grpc_url, name, warm, poisson_arrivals(300, 50))
        capacity = {name: measure_capacity(stack.grpc_url, name, _take(inputs, slice(0, 1000)))
                    for name in (f"{args.model}_vanilla", args.model)}
        rate = args.load * capacity[f"{args.model}_vanilla"]
        print(f"capacity: vanilla {capacity[f'{args.model}_vanilla']:.0f} req/s, static EE "
              f"{capacity[args.model]:.0f} req/s; replaying at {rate:.0f} req/s")
        traces = {"poisson": poisson_arrivals(count, rate, seed=1), "bursty": bursty_arrivals(count, rate, seed=2)}
        for trace, arrivals in traces.items():
            for system in ("vanilla", "static", "adaptive"):
                _set_config(client, args.model, static)
                runs[trace, system] = run_system(stack, system, trace, args.model, inputs, arrivals, log_dir)
                print(f"  {trace:8s} {system:9s} median {np.median(runs[trace, system].latencies()):.2f} ms")
        for system in ("vanilla", "static", "adaptive"):
            _set_config(client, args.model, static)
            drift[system] = run_system(stack, system, "drift", args.model, drift_inputs, traces["poisson"], log_dir)
            print(f"  drift    {system:9s} median {np.median(drift[system].latencies()):.2f} ms")

    original = np.array([a.label for a in runs["poisson", "vanilla"].answers])
    original_drift = np.array([a.label for a in drift["vanilla"].answers])
    batch = 8.0
    oracle, _ = oracle_saving(args.repository, args.model, inputs, batch)
    lines = [
        f"# Benchmark: {args.model} ({count} requests per run, rate {rate:.0f} req/s = {args.load:.0%} of vanilla "
        f"capacity)\n",
        f"Capacity (saturated closed loop): vanilla {capacity[f'{args.model}_vanilla']:.0f} req/s, early exit "
        f"(static thresholds) {capacity[args.model]:.0f} req/s "
        f"({capacity[args.model] / capacity[f'{args.model}_vanilla'] - 1:+.1%}).\n",
        "| trace | system | median ms | p25 ms | p95 ms | p99 ms | median saving | accuracy vs original | "
        "throughput req/s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (trace, _), run in runs.items():
        reference = original if trace == "poisson" else np.array([a.label for a in runs[trace, "vanilla"].answers])
        lines.append(_row(run, reference, runs[trace, "vanilla"]))
    lines += ["", "Estimated saving from profiled latencies (mean over requests, batch size 8):", "",
              "| system | estimated saving | share of oracle |", "|---|---:|---:|"]
    for system in ("static", "adaptive"):
        est = estimated_saving(args.repository, args.model, runs["poisson", system], batch)
        lines.append(f"| {system} | {est:.1%} | {est / oracle:.0%} |" if oracle > 0 else f"| {system} | {est:.1%} | - |")
    lines.append(f"| oracle | {oracle:.1%} | 100% |")
    lines += ["", f"## Drift ({drift_description})", "",
              "| system | loss before | loss after (whole second half) | loss in last quarter | exit rate before | "
              "exit rate after | median ms before | median ms after |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    half, quarter = count // 2, 3 * count // 4
    for system in ("static", "adaptive"):
        run = drift[system]
        agree = np.array([a.label == original_drift[a.index] for a in run.answers])
        exited = np.array([a.exit < manifest.final_exit for a in run.answers])
        lat = run.latencies()
        lines.append(f"| {system} | {1 - agree[:half].mean():.2%} | {1 - agree[half:].mean():.2%} | "
                     f"{1 - agree[quarter:].mean():.2%} | {exited[:half].mean():.1%} | {exited[half:].mean():.1%} | "
                     f"{np.median(lat[:half]):.2f} | {np.median(lat[half:]):.2f} |")
    v = drift["vanilla"].latencies()
    lines.append(f"| vanilla | - | - | - | - | - | {np.median(v[:half]):.2f} | {np.median(v[half:]):.2f} |")
    adaptive_configs = runs["poisson", "adaptive"].configs
    lines += ["", f"Adaptive (poisson) configurations: {len(adaptive_configs)}; last: "
              f"{json.dumps(adaptive_configs[-1][2]) if adaptive_configs else '-'}"]
    paths = plot(runs, drift, original_drift, manifest.final_exit, args.out)
    lines += ["", *[f"![{p.stem}]({p.name})" for p in paths]]
    report = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
