"""``python -m workload.soak``: the whole stack under steady open-loop load for minutes, watched for leaks and losses.

Capacity is measured first (saturating burst); then Poisson traffic at ``--load`` of it runs for ``--minutes``, in
chunks of ``--chunk`` seconds, with the controller tuning live. Between chunks the resident memory of Triton (with its
Python stub processes), the controller and Redis is sampled. The report gives requests, failures, requests not
answered exactly once, latency percentiles per chunk, RSS at start and end per process and the controller's CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from workload.bench import workload_inputs
from workload.client import Answer, measure_capacity, poisson_arrivals, replay
from workload.stack import ROOT, Process, Stack, running_stack

LOGGER = logging.getLogger("soak")


def resident_mib(pid: int) -> float:
    """Resident memory (MiB) of ``pid`` and every process below it (Triton's Python stubs are its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total_kib, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kib / 1024.0


@dataclass
class Chunk:
    """One chunk of the soak: when it ended, its answers' outcome and everyone's memory afterwards."""

    elapsed_s: float
    requests: int
    failed: int
    p50_ms: float
    p99_ms: float
    rss_mib: dict[str, float]


def run_chunk(stack: Stack, model: str, inputs: dict[str, np.ndarray], rate: float, seconds: float, seed: int,
              started: float) -> tuple[Chunk, list[Answer]]:
    count = max(1, int(rate * seconds))
    rows = np.random.default_rng(seed).integers(0, len(next(iter(inputs.values()))), size=count)
    answers = replay(stack.grpc_url, model, {name: array[rows] for name, array in inputs.items()},
                     poisson_arrivals(count, rate, seed), outputs=("LABEL",))
    latencies = np.array([a.latency_ms for a in answers if a.error is None])
    chunk = Chunk(time.monotonic() - started, len(answers), sum(a.error is not None for a in answers),
                  float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
                  float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
                  memory(stack.processes))
    return chunk, answers


def memory(processes: list[Process]) -> dict[str, float]:
    return {process.name: resident_mib(process.popen.pid) for process in processes}


def report(path: Path, args: argparse.Namespace, capacity: float, rate: float, start_rss: dict[str, float],
           chunks: list[Chunk], answers: list[Answer], controller_cpu_s: float, wall_s: float) -> str:
    latencies = np.array([a.latency_ms for a in answers if a.error is None])
    failed = sum(a.error is not None for a in answers)
    errors = sorted({a.error for a in answers if a.error})[:5]
    lines = [
        f"# Soak: {args.model}, {args.minutes:g} min at {100 * args.load:.0f} % of capacity",
        "",
        f"Command: `python -m workload.soak --model {args.model} --dataset {args.dataset} --minutes {args.minutes:g} "
        f"--load {args.load:g}`. Capacity (saturating burst) {capacity:.1f} req/s; offered {rate:.1f} req/s "
        "(Poisson), the controller tuning live. Every request is a plain unary gRPC call and the client waits for "
        "each one's answer (a missing answer stops the run), so \"answered exactly once\" means: no error.",
        "",
        "| requests | failed | p50 ms | p99 ms | controller CPU (% of a core) |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(answers)} | {failed} | {np.percentile(latencies, 50):.1f} | "
        f"{np.percentile(latencies, 99):.1f} | {100 * controller_cpu_s / wall_s:.1f} |",
        "",
        "Resident memory (MiB; Triton with its Python stub processes):",
        "",
        "| process | start | end | change |",
        "|---|---:|---:|---:|",
    ]
    end = chunks[-1].rss_mib
    lines += [f"| {name} | {start_rss[name]:.0f} | {end[name]:.0f} | {end[name] - start_rss[name]:+.0f} |"
              for name in start_rss]
    lines += ["", "Per chunk:", "", "| minute | requests | failed | p50 ms | p99 ms | "
              + " | ".join(f"{name} MiB" for name in start_rss) + " |",
              "|---:|---:|---:|---:|---:|" + "---:|" * len(start_rss)]
    lines += [f"| {c.elapsed_s / 60:.1f} | {c.requests} | {c.failed} | {c.p50_ms:.1f} | {c.p99_ms:.1f} | "
              + " | ".join(f"{c.rss_mib[name]:.0f}" for name in start_rss) + " |" for c in chunks]
    if errors:
        lines += ["", "Errors seen (first five kinds):", ""] + [f"- `{e}`" for e in errors]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="early-exit entry of the model repository")
    parser.add_argument("--dataset", required=True, help="cifar10, digits or sst2 (the requests' inputs)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="offered load as a fraction of measured capacity")
    parser.add_argument("--chunk", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "soak.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inputs, warm, _, _ = workload_inputs(args.dataset, args.data_dir, 2000)
    with running_stack(args.repository, models=[args.model], controller_args=["--model", args.model]) as stack:
        replay(stack.grpc_url, args.model, warm, poisson_arrivals(len(next(iter(warm.values()))), 100.0),
               outputs=("LABEL",))
        capacity = measure_capacity(stack.grpc_url, args.model, inputs)
        rate = args.load * capacity
        LOGGER.info("capacity %.1f req/s; soaking at %.1f req/s for %g min", capacity, rate, args.minutes)
        controller = stack.process("controller")
        start_rss, cpu_before, started = memory(stack.processes), controller.cpu_seconds(), time.monotonic()
        chunks: list[Chunk] = []
        answers: list[Answer] = []
        chunk_count = max(1, round(60 * args.minutes / args.chunk))
        for index in tqdm(range(chunk_count), desc="soak", unit="chunk"):
            chunk, chunk_answers = run_chunk(stack, args.model, inputs, rate, args.chunk, index, started)
            chunks.append(chunk)
            answers += chunk_answers
        wall = time.monotonic() - started
        text = report(args.out, args, capacity, rate, start_rss, chunks, answers,
                      controller.cpu_seconds() - cpu_before, wall)
    print(text)
    return 0 if all(a.error is None for a in answers) else 1


if __name__ == "__main__":
    raise SystemExit(main())
