"""``make profile``: where the time of a request goes, early-exit entry against its vanilla twin.

Under the same open-loop Poisson load on the same server, for the vanilla entry, the early-exit entry with every
ramp off, and the early-exit entry with its bootstrap ramps on, it splits the client-measured latency into
Triton's queue, the backend's ``execute`` (from Triton's own statistics) and the rest (client, gRPC, Triton core and
the Python stub's IPC), and reports capacity. In process, on the served artifacts, it times the backbone per batch
size (one fused graph vs the blocks run one by one), each ramp head, and the feedback record; and the controller's
side: decoding feedback and one tuning round. Writes ``overhead.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis
import torch
import tritonclient.http as httpclient

from controller.latency import LatencyModel
from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.model_config import vanilla_twin
from early_exit.runtime import EarlyExitModel
from workload.bench import _set_config, _take, offline_verdicts, workload_inputs
from workload.client import measure_capacity, poisson_arrivals, replay
from workload.stack import ROOT, running_stack
from workload.tuner_cost import tuning_ms

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def _stats(url: str, model: str) -> dict[str, float]:
    """Triton's cumulative statistics of ``model``: nanoseconds per phase, requests and executions."""
    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    inference = stats["inference_stats"]
    out = {phase: float(inference[phase]["ns"]) for phase in PHASES}
    out["requests"] = float(inference["success"]["count"])
    out["executions"] = float(stats["execution_count"])
    return out


def _median_ms(fn: Callable[[], object], repeats: int = 200, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return 1000 * float(np.median(samples))


@torch.inference_mode()
def in_process(served: EarlyExitModel, vanilla: EarlyExitModel, inputs: dict[str, np.ndarray],
               active: list[int]) -> list[str]:
    """Markdown rows: backbone and ramp costs per batch size, as the backend runs them."""
    lines = ["| batch | vanilla entry ms | early-exit entry, ramps off (fused) ms | blocks one by one ms | "
             f"bootstrap ramps {active} on ms | each ramp head ms (mean) |", "|---:|---:|---:|---:|---:|---:|"]
    manifest = served.manifest
    for batch in (1, 8):
        tensors = {k: torch.from_numpy(v) for k, v in _take(inputs, slice(0, batch)).items()}

        def chain(tensors: dict[str, torch.Tensor] = tensors) -> None:
            values = dict(tensors)
            for spec, block in zip(manifest.blocks, served.blocks):
                outputs = block(*(values[name] for name in spec.inputs))
                values.update(zip(spec.outputs, (outputs,) if isinstance(outputs, torch.Tensor) else outputs))

        ramp_ms = [v.cost_ms for v in list(served.stages(tensors, list(range(len(manifest.ramps)))))[:-1]]
        lines.append(
            f"| {batch} | {_median_ms(lambda t=tensors: list(vanilla.stages(t, []))):.3f} | "
            f"{_median_ms(lambda t=tensors: list(served.stages(t, []))):.3f} | {_median_ms(chain):.3f} | "
            f"{_median_ms(lambda t=tensors: list(served.stages(t, active))):.3f} | {np.mean(ramp_ms):.3f} |"
        )
    return lines


def controller_costs(served: EarlyExitModel, inputs: dict[str, np.ndarray]) -> list[str]:
    """Decoding a batch-8 feedback record with every ramp active, and one tuning round on 2,000 samples."""
    confidence, prediction, final = offline_verdicts(served, _take(inputs, slice(0, 2000)))
    ramps = tuple(range(confidence.shape[0]))
    record = FeedbackRecord("m", 1, ramps, confidence[:, :8], prediction[:, :8], final[:8], np.zeros(8, np.int16),
                            BatchTiming(1.0, 0.1, 1.0, np.ones(8)))
    fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in record.encode().items()}
    latency = LatencyModel.from_manifest(served.manifest, 8.0)
    cold_ms, warm_ms = tuning_ms(confidence, prediction, final, latency.exit_latencies(list(ramps)), repeats=10)
    return [
        f"- encode one feedback record (batch 8, {len(ramps)} ramps): {_median_ms(record.encode) * 1000:.0f} us; "
        f"decode: {_median_ms(lambda: FeedbackRecord.decode(fields)) * 1000:.0f} us",
        f"- one tuning round, {len(ramps)} ramps x {confidence.shape[1]} samples: {cold_ms:.1f} ms from scratch, "
        f"{warm_ms:.1f} ms from the tuned thresholds",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.overhead", description=__doc__)
    parser.add_argument("--model", default="sst2_minilm")
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--load", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args(argv)
    inputs, warm, _, _ = workload_inputs(args.dataset, args.data_dir, args.requests)
    served = EarlyExitModel(args.repository / args.model / "1")
    twin = vanilla_twin(args.model)
    vanilla = EarlyExitModel(args.repository / twin / "1")
    static = dict(served.manifest.initial_thresholds)
    torch.set_num_threads(2)
    lines = [f"# Where the time goes: {args.model}", "", "## In process (the backend's code path, one thread of "
             "control, no server)", ""]
    lines += in_process(served, vanilla, inputs, sorted(static))
    lines += ["", "## Controller", ""] + controller_costs(served, inputs)
    rows = []
    with running_stack(args.repository, models=[args.model, twin], with_controller=False,
                       log_dir=args.out / args.model / "logs") as stack:
        client = redis.Redis.from_url(stack.redis_url)
        http = f"127.0.0.1:{stack.ports.http}"
        for name in (twin, args.model):
            replay(stack.grpc_url, name, _take(warm, slice(0, 300)), poisson_arrivals(300, 50))
        _set_config(client, args.model, static)
        capacity = measure_capacity(stack.grpc_url, twin, _take(warm, slice(0, 1000)))
        arrivals = poisson_arrivals(len(next(iter(inputs.values()))), args.load * capacity, seed=4)
        for system, name, thresholds in (("vanilla", twin, None), ("ramps off", args.model, {}),
                                         (f"bootstrap ramps {sorted(static)}", args.model, static)):
            if thresholds is not None:
                _set_config(client, args.model, thresholds)
            saturated = measure_capacity(stack.grpc_url, name, _take(warm, slice(0, 1000)))
            before = _stats(http, name)
            answers = replay(stack.grpc_url, name, inputs, arrivals)
            after = _stats(http, name)
            requests = after["requests"] - before["requests"]
            per_request = {phase: (after[phase] - before[phase]) / requests / 1e6 for phase in PHASES}
            batch = requests / max(after["executions"] - before["executions"], 1)
            latency = np.array([a.latency_ms for a in answers])
            server = sum(per_request.values())
            rows.append(f"| {system} | {np.median(latency):.2f} | {latency.mean():.2f} | {per_request['queue']:.2f} | "
                        f"{per_request['compute_infer'] + per_request['compute_input'] + per_request['compute_output']:.2f}"
                        f" | {latency.mean() - server:.2f} | {batch:.2f} | {saturated:.0f} |")
    lines += ["", f"## Served (open-loop Poisson at {args.load:.0%} of vanilla capacity, {args.requests} requests, "
              "plain gRPC, all four outputs)", "",
              "Mean per request: Triton queue, backend `execute` (Triton's compute input + infer + output; for the "
              "early-exit entry an early answer leaves before `execute` returns, so this overstates what an exited "
              "request waits), and the rest of the client-measured latency (client, gRPC, Triton core, Python stub "
              "IPC).", "",
              "| entry | median ms | mean ms | queue ms | execute ms | rest ms | mean batch | capacity req/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|", *rows]
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "overhead.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
