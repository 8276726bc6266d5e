"""``make demo``: the whole loop, live: vanilla vs early exits steered by the controller, side by side.

Starts Redis, Triton (the early-exit entry and its vanilla twin) and the controller; replays one Poisson trace against
the vanilla model, then the same trace against the early-exit model with the controller tuning live, and prints as it
goes: configuration version and thresholds, exits per ramp, agreement with the original model and latency against
vanilla on the same requests. It ends with a verdict that says whether early exits paid on this machine, and why not
when they did not. Everything is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from controller.config_store import read_config
from controller.guard import AccuracyGuard
from early_exit.keys import RedisKeys
from early_exit.manifest import load_manifest
from early_exit.model_config import vanilla_twin
from workload.bench import workload_inputs
from workload.client import Answer, poisson_arrivals, replay, service_ms
from workload.metrics import exits_per_ramp
from workload.stack import ROOT, running_stack


def _latency(answers: list[Answer]) -> np.ndarray:
    return np.array([a.latency_ms for a in answers if a.error is None])


def _replay_watched(url: str, model: str, inputs: dict[str, np.ndarray], arrivals: np.ndarray, every_s: float,
                    report: Callable[[list[Answer]], str | None]) -> list[Answer]:
    """Replay the trace in a worker thread and print ``report(answers so far)`` every ``every_s`` seconds (nothing
    when it returns ``None``), so that a run of several minutes shows how it goes. A failure of the replay itself is
    raised here, as a plain ``replay`` call would."""
    answers: list[Answer] = []
    failures: list[Exception] = []

    def run() -> None:
        try:
            replay(url, model, inputs, arrivals, answers=answers)
        except Exception as exc:  # handed to the caller's thread below
            failures.append(exc)

    worker = threading.Thread(target=run, name=f"replay-{model}")
    worker.start()
    while worker.is_alive():
        worker.join(every_s)
        line = report(list(answers))
        if line is not None:
            print(line, flush=True)
    if failures:
        raise failures[0]
    return answers


def _recent(answers: list[Answer]) -> list[Answer]:
    """The last 300 answered requests: the window the progress lines describe."""
    return [a for a in answers if a.label >= 0][-300:]


def _table(vanilla: list[Answer], early: list[Answer], original: np.ndarray) -> tuple[str, float, float]:
    """Markdown table of both runs (whole and second half), and the second half's median saving and agreement."""
    half = len(early) // 2
    rows = ["| run | requests | median ms | p95 ms | p99 ms | agreement with original |", "|---|---:|---:|---:|---:|---:|"]
    agreement = 0.0
    for name, answers in (("vanilla", vanilla), ("early exit, whole run", early), ("vanilla, second half",
                          vanilla[half:]), ("early exit, second half (tuned)", early[half:])):
        p50, p95, p99 = np.percentile(_latency(answers), [50, 95, 99])
        agreement = float(np.mean([a.label == original[a.index] for a in answers]))  # the last row's is returned
        rows.append(f"| {name} | {len(answers)} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {agreement:.2%} |")
    saving = 1 - np.median(_latency(early[half:])) / np.median(_latency(vanilla[half:]))
    return "\n".join(rows), float(saving), agreement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.demo", description=__doc__)
    parser.add_argument("--model", default="sst2_minilm")
    parser.add_argument("--dataset", default="sst2", help="sst2, cifar10 or digits")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--load", type=float, default=0.25,
                        help="vanilla's utilisation at one request at a time: the Poisson arrival rate is load "
                        "divided by its server time per request")
    args = parser.parse_args(argv)

    inputs, warm, _, _ = workload_inputs(args.dataset, args.data_dir, args.requests)
    count = len(next(iter(inputs.values())))
    manifest = load_manifest(args.repository / args.model / "1")
    print(f"model {args.model}: {len(manifest.ramps)} candidate ramps, initial thresholds "
          f"{ {r: round(t, 3) for r, t in manifest.initial_thresholds.items()} }; {count} requests")
    twin = vanilla_twin(args.model)
    with running_stack(args.repository, models=[args.model, twin]) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        print(f"Triton gRPC {stack.grpc_url}, metrics {stack.metrics_url}, Redis {stack.redis_url}")
        warm_count = len(next(iter(warm.values())))
        for name in (twin, args.model):  # first batches of each size run slower: not measured
            replay(stack.grpc_url, name, {k: v[:200] for k, v in warm.items()},
                   poisson_arrivals(min(200, warm_count), 50))
        service = service_ms(stack.grpc_url, twin, {k: v[:200] for k, v in warm.items()})
        rate = args.load * 1000.0 / service
        arrivals = poisson_arrivals(count, rate)
        print(f"vanilla serves a request in {service:.1f} ms; replaying at {rate:.0f} req/s ({args.load:.0%} load)")
        print(f"\n[1/2] vanilla, {count} requests ({count / rate / 60:.1f} min) ...")

        def vanilla_progress(answers: list[Answer]) -> str | None:
            recent = _recent(answers)
            if not recent:
                return None
            return f"  {len(answers):>5} sent | last 300: median {np.median([a.latency_ms for a in recent]):.1f} ms"

        vanilla = _replay_watched(stack.grpc_url, twin, inputs, arrivals, 15.0, vanilla_progress)
        original = np.array([a.label for a in vanilla])
        vanilla_ms = np.array([a.latency_ms for a in vanilla])
        print("[2/2] early exits, controller tuning live ...")
        before = exits_per_ramp(stack.metrics_url, args.model)
        exits: dict[int, int] = {}

        def early_progress(answers: list[Answer]) -> str | None:
            nonlocal exits
            recent = _recent(answers)
            if not recent:
                return None
            agree = np.mean([a.label == original[a.index] for a in recent])
            median = np.median([a.latency_ms for a in recent])
            base = np.median(vanilla_ms[[a.index for a in recent]])
            config = read_config(client, RedisKeys(args.model))
            live = config.thresholds if config else manifest.initial_thresholds  # v0: the bootstrap thresholds
            thresholds = {r: round(t, 3) for r, t in live.items()}
            exits = {e: n - before.get(e, 0) for e, n in sorted(exits_per_ramp(stack.metrics_url, args.model).items())
                     if n > before.get(e, 0)}
            return (f"  {len(answers):>5} sent | v{config.version if config else 0} thresholds {thresholds or 'off'} | "
                    f"exits {exits} | last 300: agreement {agree:.2%}, median {median:.1f} ms vs vanilla {base:.1f} ms")

        answers = _replay_watched(stack.grpc_url, args.model, inputs, arrivals, 3.0, early_progress)
        config = read_config(client, RedisKeys(args.model))
        print(f"exits per ramp ({manifest.final_exit} = final layer): {exits}")
        controller_log = stack.process("controller").log.read_text(errors="replace")
    errors = sum(a.error is not None for a in answers + vanilla)
    table, saving, agreement = _table(vanilla, answers, original)
    print("\n" + table + f"\n\nfailed requests: {errors}")
    floor = AccuracyGuard().floor  # the controller's default budget, which the demo runs it with
    if saving > 0.03 and agreement < floor:
        print(f"\nEarly exits were {saving:.1%} faster than vanilla (tuned half), but served {agreement:.2%} agreement "
              f"with the original model, below the budget's {floor:.0%}: the controller had not tuned them within the "
              "budget by the end of this run (a round needs a few hundred answers; run more --requests).")
    elif saving > 0.03:
        print(f"\nEarly exits paid: median latency {saving:.1%} lower than vanilla on the same requests (tuned half), "
              f"at {agreement:.2%} agreement with the original model.")
    elif config is not None and not config.active_ramps:
        print(f"\nEarly exits did not pay on this machine ({saving:+.1%} median): the controller measured that the "
              "ramps cost more than the exits saved at this load and switched them off, so the model now runs its "
              "fused vanilla graph. This is expected when a model's compute is small against the per-request serving "
              "overhead (gRPC, Triton, the Python backend): try a deeper model, a GPU, or `--model sst2_minilm`.")
    else:
        print(f"\nEarly exits did not pay in this run ({saving:+.1%} median). The controller log says why:")
        print("\n".join(controller_log.splitlines()[-8:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
