"""``make demo``: the whole loop, live, on the reference model.

Starts Redis, Triton (early-exit model and its vanilla twin) and the controller; replays one Poisson trace of test
images against the vanilla model, then the same trace against the early-exit model starting from "no exits", and
prints as it goes: exits per ramp, configuration version and thresholds, accuracy vs the original model and latency.
Everything is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import numpy as np
import redis

from controller.config_store import read_config, write_config
from early_exit.exit_config import NEVER_EXIT, ExitConfig
from early_exit.keys import RedisKeys
from early_exit.manifest import load_manifest
from model_zoo.datasets import load_image_set
from workload.client import Answer, measure_capacity, poisson_arrivals, replay
from workload.metrics import exits_per_ramp
from workload.stack import ROOT, running_stack


def summarize(answers: list[Answer]) -> tuple[float, float]:
    latencies = np.array([a.latency_ms for a in answers if a.error is None])
    return float(np.median(latencies)), float(np.percentile(latencies, 95))


def reset_to_no_exits(client: redis.Redis, model: str, ramps: list[int]) -> None:
    """Start the demo from "no exits" so the controller's learning is visible."""
    keys = RedisKeys(model)
    current = read_config(client, keys)
    version = (current.version if current else 0) + 1
    write_config(client, keys, ExitConfig(model, version, {r: NEVER_EXIT for r in ramps}, writer="demo"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.demo", description=__doc__)
    parser.add_argument("--model", default="cifar10_resnet")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--load", type=float, default=0.4,
                        help="Poisson arrival rate as a fraction of the vanilla model's measured capacity")
    args = parser.parse_args(argv)

    test = load_image_set(args.dataset, "test", args.data_dir)
    order = np.random.default_rng(0).permutation(len(test))
    count = min(args.requests, len(test))
    images = test.images[order[:count]]
    manifest = load_manifest(args.repository / args.model / "1")
    ramps = sorted(manifest.initial_thresholds) or list(range(len(manifest.ramps)))
    print(f"model {args.model}: {len(manifest.ramps)} candidate ramps, initial set {ramps}; {count} requests")
    with running_stack(args.repository, models=[args.model, f"{args.model}_vanilla"]) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        print(f"Triton gRPC {stack.grpc_url}, metrics {stack.metrics_url}, Redis {stack.redis_url}")
        for name in (f"{args.model}_vanilla", args.model):  # first batches of each size run slower: not measured
            replay(stack.grpc_url, name, {"IMAGE": images[:200]}, poisson_arrivals(200, 100))
        capacity = measure_capacity(stack.grpc_url, f"{args.model}_vanilla", {"IMAGE": images[:1000]})
        rate = args.load * capacity
        arrivals = poisson_arrivals(count, rate)
        print(f"vanilla capacity {capacity:.0f} req/s; replaying at {rate:.0f} req/s ({args.load:.0%})")
        print("\n[1/2] vanilla (no exits) ...")
        vanilla = replay(stack.grpc_url, f"{args.model}_vanilla", {"IMAGE": images}, arrivals, outputs=("LABEL",))
        original = np.array([a.label for a in vanilla])
        reset_to_no_exits(client, args.model, ramps)
        print("[2/2] early exits, controller tuning live ...")
        answers: list[Answer] = []
        worker = threading.Thread(
            target=replay, args=(stack.grpc_url, args.model, {"IMAGE": images}, arrivals), kwargs={"answers": answers}
        )
        worker.start()
        while worker.is_alive():
            worker.join(2.0)
            done = [a for a in list(answers) if a.label >= 0]
            if not done:
                continue
            recent = done[-500:]
            agree = np.mean([a.label == original[a.index] for a in recent])
            config = read_config(client, RedisKeys(args.model))
            thresholds = {r: round(t, 3) for r, t in config.thresholds.items()} if config else {}
            exits = dict(sorted(exits_per_ramp(stack.metrics_url, args.model).items()))
            median = np.median([a.latency_ms for a in recent])
            print(f"  {len(done):>5} answered | config v{config.version if config else 0} thresholds {thresholds}"
                  f" | exits {exits} | last 500: acc vs original {agree:.2%}, median {median:.1f} ms")
        errors = sum(a.error is not None for a in answers + vanilla)
        half = len(answers) // 2
        v_med, v_p95 = summarize(vanilla)
        all_med, all_p95 = summarize(answers)
        s_med, s_p95 = summarize(answers[half:])
        v_tail_med, v_tail_p95 = summarize(vanilla[half:])
        agree_all = np.mean([a.label == original[a.index] for a in answers])
        agree_tail = np.mean([a.label == original[a.index] for a in answers[half:]])
        print("\n| run | requests | median ms | p95 ms | accuracy vs original |")
        print("|---|---:|---:|---:|---:|")
        print(f"| vanilla | {count} | {v_med:.2f} | {v_p95:.2f} | 100.00% |")
        print(f"| early exit, whole run (from no exits) | {count} | {all_med:.2f} | {all_p95:.2f} | {agree_all:.2%} |")
        print(f"| vanilla, second half | {count - half} | {v_tail_med:.2f} | {v_tail_p95:.2f} | 100.00% |")
        print(f"| early exit, second half (tuned) | {count - half} | {s_med:.2f} | {s_p95:.2f} | {agree_tail:.2%} |")
        print(f"\nmedian latency saving (second half): {1 - s_med / v_tail_med:.1%}; failed requests: {errors}")
        exits = dict(sorted(exits_per_ramp(stack.metrics_url, args.model).items()))
        print(f"exits per ramp (Triton metrics; {manifest.final_exit} = final layer): {exits}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
