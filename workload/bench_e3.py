"""``make bench-e3``: goodput of the original model, Apparate mode and E3 mode on the same cores, trace and SLO.

Goodput is what E3 is for: requests answered correctly-formed within the latency objective (SLO) per second. The
SLO is ``--slo-factor`` times the original model's unloaded median latency, measured first in the same run. Then:

1. the cost of a router-to-block hop is measured: an E3 entry with a single block group (no exit) against the
   original model at saturation; the difference in compute per request is the hop the planner must pay for;
2. the planner chooses the exits, batch size and replicas for that SLO and hop cost, and the E3 entries are
   (re)loaded through Triton's model-control API;
3. every system replays Poisson traces of the same inputs at offered loads from below to well above the original
   model's capacity, twice, in alternating order; goodput is the number of answers within the SLO over the trace's
   duration. The controller runs throughout, as in production, tuning both early-exit entries and re-sizing E3's
   block models when the share of requests reaching them drifts (the report says whether it did).

The original model and Apparate mode run in two instance layouts on the same cores, reloaded through the
model-control API with a configuration override: one instance using every core (``1x2``, the entries as prepared)
and one single-threaded instance per core (``2x1``), since on a CPU the second serves small batches faster and E3's
block models use it too. E3 is compared with the better of the two, so its gain is not a layout's.

Reports goodput and its ratio to the original model's (best over the offered loads, both repeats), p50/p99,
agreement with the original model's answers, the plan chosen, each block model's observed survivors and average
batch size (Triton statistics), the hop cost, and the CPU every process spends per request at one offered load
(``--cpu-load``): at the small batches an SLO allows, a block call's fixed cost weighs more than at saturation.
Writes ``e3_report.md`` and ``e3_goodput.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import tritonclient.http as httpclient

from controller.config_store import read_plan
from controller.prepare.e3 import main as plan_e3
from early_exit.e3_plan import PLAN_FILE, E3Plan, block_model_name
from early_exit.keys import RedisKeys
from workload.bench import CONTROLLER_ARGS, Inputs, workload_inputs
from workload.client import Answer, measure_capacity, poisson_arrivals, replay
from workload.stack import ROOT, Stack, running_stack, start_controller


@dataclass(frozen=True)
class LoadPoint:
    """One system at one offered load: its answers and the trace's duration."""

    system: str
    offered: float
    repeat: int
    answers: list[Answer]
    seconds: float

    def good(self, slo_ms: float) -> np.ndarray:
        return np.array([a.error is None and a.latency_ms <= slo_ms for a in self.answers])

    def goodput(self, slo_ms: float) -> float:
        return float(self.good(slo_ms).sum() / self.seconds)

    def latencies(self) -> np.ndarray:
        return np.array([a.latency_ms for a in self.answers if a.error is None])


@dataclass
class Sweeper:
    """Replays a Poisson trace at each offered rate against one system, cycling through the inputs."""

    stack: Stack
    inputs: Inputs
    rates: list[float]
    seconds: float
    slo_ms: float
    points: list[LoadPoint] = field(default_factory=list)
    routed: dict[str, int] = field(default_factory=dict)  # requests sent per served model

    def run(self, system: str, name: str, repeat: int) -> None:
        pool = len(next(iter(self.inputs.values())))
        for rate in self.rates:
            count = int(rate * self.seconds)
            arrivals = poisson_arrivals(count, rate, seed=10 * repeat + int(rate))
            index = np.arange(count) % pool
            answers = replay(self.stack.grpc_url, name, _take(self.inputs, index), arrivals, timeout=600)
            for answer in answers:
                answer.index = int(index[answer.index])
            self.routed[name] = self.routed.get(name, 0) + count
            self.points.append(LoadPoint(system, rate, repeat, answers, float(arrivals[-1])))
            print(f"  {rate:6.0f} req/s {system:12s} goodput {self.points[-1].goodput(self.slo_ms):6.1f}", flush=True)


def _take(inputs: Inputs, index: np.ndarray) -> Inputs:
    return {name: array[index] for name, array in inputs.items()}


def _load_e3(stack: Stack, repository: Path, model: str, previous: list[str]) -> list[str]:
    """(Re)load the E3 router and its block models as planned on disk; unload block models no longer planned."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{stack.ports.http}", network_timeout=300)
    e3 = f"{model}_e3"
    plan = E3Plan.from_json((repository / e3 / "1" / PLAN_FILE).read_text())
    blocks = [block_model_name(e3, k) for k in range(len(plan.groups))]
    for name in previous:
        if name not in blocks and name != e3:
            client.unload_model(name)
    for name in [*blocks, e3]:
        client.load_model(name)
    return [*blocks, e3]


LAYOUTS = {"1x2": (1, 0), "2x1": (2, 1)}  # instances, torch threads per instance (0: torch's default)


def _relayout(stack: Stack, names: list[str], layout: str, warm: Inputs) -> None:
    """Reload ``names`` with ``layout``'s instance count and threads (a configuration override, nothing on disk)."""
    instances, threads = LAYOUTS[layout]
    for name in names:
        stack.reload(name, {"threads": str(threads)}, instance_group=[{"count": instances, "kind": "KIND_CPU"}])
        replay(stack.grpc_url, name, warm, poisson_arrivals(len(next(iter(warm.values()))), 50))


def _block_stats(stack: Stack, names: list[str]) -> dict[str, tuple[int, int]]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{stack.ports.http}")
    stats = {m["name"]: m for m in client.get_inference_statistics()["model_stats"]}
    return {name: (int(stats[name]["inference_count"]), int(stats[name]["execution_count"])) for name in names}


def _unloaded_median(stack: Stack, model: str, inputs: Inputs, count: int = 200) -> float:
    answers = replay(stack.grpc_url, model, _take(inputs, np.arange(count)), poisson_arrivals(count, 10.0, seed=5))
    return float(np.median([a.latency_ms for a in answers if a.error is None]))


def _capacity(stack: Stack, model: str, inputs: Inputs, repeats: int = 3) -> float:
    """Median saturated capacity; bursts of 250 stay below the E3 router's default in-flight bound (256)."""
    sample = _take(inputs, np.arange(min(250, len(next(iter(inputs.values()))))))
    return float(np.median([measure_capacity(stack.grpc_url, model, sample) for _ in range(repeats)]))


def _plan_and_load(stack: Stack, args: argparse.Namespace, slo_ms: float, inputs: Inputs,
                   warm: Inputs) -> tuple[float, E3Plan, list[str]]:
    """Measure the hop cost with a one-group E3 entry against the original model in the same layout (one
    single-threaded instance per core), then plan for the SLO and that cost and load the plan."""
    model, e3 = args.model, f"{args.model}_e3"
    common = ["--name", model, "--repository", str(args.repository), "--slo-ms", f"{slo_ms:.3f}",
              "--instances", str(args.instances)]
    plan_e3([*common, "--exits", ""])
    loaded = _load_e3(stack, args.repository, model, [])
    replay(stack.grpc_url, e3, warm, poisson_arrivals(len(next(iter(warm.values()))), 50))
    _relayout(stack, [f"{model}_vanilla"], "2x1", warm)
    single, base = _capacity(stack, e3, inputs), _capacity(stack, f"{model}_vanilla", inputs)
    hop_ms = max(0.0, 1000.0 * args.instances * (1.0 / single - 1.0 / base))
    print(f"SLO {slo_ms:.1f} ms; hop {hop_ms:.3f} ms (one-group E3 {single:.0f} vs {base:.0f} req/s)", flush=True)
    plan_e3([*common, "--hop-ms", f"{hop_ms:.4f}"])
    plan = E3Plan.from_json((args.repository / e3 / "1" / PLAN_FILE).read_text())
    loaded = _load_e3(stack, args.repository, model, loaded)
    replay(stack.grpc_url, e3, warm, poisson_arrivals(len(next(iter(warm.values()))), 50))
    return hop_ms, plan, loaded


def cpu_per_request(stack: Stack, systems: dict[str, str], inputs: Inputs, rate: float,
                    seconds: float) -> dict[str, dict[str, float]]:
    """CPU milliseconds per request of every process taking part (this client, Triton's own process, each model's
    stubs) while one Poisson trace at ``rate`` is replayed against each system in turn: what a request costs at the
    batch sizes that load gives, where the capacity bursts give the largest. Keys: system, then process."""
    count = int(rate * seconds)
    sample = _take(inputs, np.arange(count) % len(next(iter(inputs.values()))))
    triton = stack.process("triton")
    costs = {}
    for system, name in systems.items():
        before, client = triton.cpu_by_model(), time.process_time()
        replay(stack.grpc_url, name, sample, poisson_arrivals(count, rate, seed=7))
        client, after = time.process_time() - client, triton.cpu_by_model()
        used = {"client": client, **{k: v - before.get(k, 0.0) for k, v in after.items()}}
        costs[system] = {k: 1000.0 * v / count for k, v in used.items() if 1000.0 * v / count >= 0.01}
    return costs


def plot(points: list[LoadPoint], slo_ms: float, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(p.system for p in points):
        mine = [p for p in points if p.system == system]
        offered = sorted({p.offered for p in mine})
        best = [max(p.goodput(slo_ms) for p in mine if p.offered == rate) for rate in offered]
        axis.plot(offered, best, marker="o", label=system)
    top = max(p.offered for p in points)
    axis.plot([0, top], [0, top], color="grey", linestyle=":", label="offered")
    axis.set(xlabel="offered load (req/s)", ylabel=f"goodput (req/s within {slo_ms:.0f} ms)",
             title="goodput vs offered load")
    axis.legend()
    fig.tight_layout()
    path = out / "e3_goodput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(args: argparse.Namespace, slo_ms: float, v50: float, capacity: dict[str, float], hop_ms: float,
           plan: E3Plan, points: list[LoadPoint], original: np.ndarray, stats: dict[str, tuple[int, int]],
           requests: int, controller_cpu: float, seconds: float, plot_path: Path,
           cpu: tuple[float, dict[str, dict[str, float]]], in_force: E3Plan) -> str:
    best = {system: max(p.goodput(slo_ms) for p in points if p.system == system)
            for system in dict.fromkeys(p.system for p in points)}
    lines = [
        f"# E3 goodput benchmark: {args.model}\n",
        f"SLO {slo_ms:.1f} ms = {args.slo_factor:g} x the original model's unloaded median ({v50:.2f} ms). "
        f"Saturated capacity (closed loop, median of 3): "
        + ", ".join(f"{k} {v:.0f} req/s" for k, v in capacity.items()) + ".",
        f"Hop cost (a one-group E3 entry against the original model at saturation): {hop_ms:.3f} ms of compute per "
        "sample and hop.\n",
        "## Best goodput over the offered loads (both repeats)\n",
        "| system | goodput req/s | vs best original | vs best Apparate mode |", "|---|---:|---:|---:|",
    ]
    top = {kind: max(v for k, v in best.items() if k.startswith(kind)) for kind in ("vanilla", "apparate")}
    for system, value in best.items():
        lines.append(f"| {system} | {value:.1f} | {value / top['vanilla']:.2f}x | {value / top['apparate']:.2f}x |")
    lines += ["", "## Every load point\n",
              "| offered req/s | system | repeat | goodput req/s | p50 ms | p99 ms | errors | agreement with original |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.offered, p.system, p.repeat)):
        lat = p.latencies()
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2)
        agree = np.mean([a.label == original[a.index % len(original)] for a in p.answers if a.error is None])
        errors = sum(a.error is not None for a in p.answers)
        lines.append(f"| {p.offered:.0f} | {p.system} | {p.repeat} | {p.goodput(slo_ms):.1f} | {p50:.1f} | "
                     f"{p99:.1f} | {errors} | {agree:.2%} |")
    rate, costs = cpu
    processes = list(dict.fromkeys(k for used in costs.values() for k in used))
    lines += ["", f"## CPU per request at {rate:.0f} req/s offered (Poisson, no controller)\n",
              "Milliseconds of CPU time (user + system, from the OS) per request, by process: the client, Triton's own "
              "process (gRPC, batchers, BLS routing) and each model's Python stubs (all its instances).\n",
              "| process | " + " | ".join(costs) + " |", "|---|" + "---:|" * len(costs)]
    for process in [*processes, "total"]:
        values = [sum(used.values()) if process == "total" else used.get(process) for used in costs.values()]
        lines.append(f"| {process} | " + " | ".join("" if v is None else f"{v:.2f}" for v in values) + " |")
    expected = plan.expected
    lines += ["", "## Plan\n",
              f"Exits {list(plan.exits)}, thresholds {plan.thresholds}, batch {expected.get('batch_size')}, "
              f"replicas {[g.replicas for g in plan.groups]}, traced share {plan.sample_rate:.0%}. Modelled compute "
              f"per request {expected.get('cost_ms', 0):.3f} ms vs {expected.get('vanilla_cost_ms', 0):.3f} ms "
              f"({expected.get('capacity_gain', 0):.2f}x), validation agreement {expected.get('agreement', 0):.2%}.",
              "", "| block model | blocks | exit | modelled survivors | observed survivors | average batch |",
              "|---|---|---|---:|---:|---:|"]
    for k, group in enumerate(plan.groups):
        name = block_model_name(f"{args.model}_e3", k)
        inferences, executions = stats.get(name, (0, 0))
        lines.append(f"| {name} | {group.first_block}-{group.last_block} | "
                     f"{'final' if group.ramp is None else group.ramp} | {expected['survivors'][k]:.0%} | "
                     f"{inferences / max(requests, 1):.0%} | {inferences / max(executions, 1):.1f} |")
    if in_force.revision:
        sized_for = ", ".join(f"{share:.0%}" for share in in_force.expected["survivors"])
        lines += ["", f"The controller re-sized the block models {in_force.revision} time(s) during the sweep; "
                  f"in force at its end: sized for {sized_for} of requests reaching them, queue delays "
                  f"{[g.queue_delay_us for g in in_force.groups]} us (as prepared "
                  f"{[g.queue_delay_us for g in plan.groups]}), replicas {[g.replicas for g in in_force.groups]}."]
    else:
        lines += ["", "The block models kept the prepared sizing throughout the sweep (no re-sizing)."]
    lines += ["", f"Controller CPU over the load sweep: {controller_cpu:.1f} s in {seconds:.0f} s "
              f"({controller_cpu / max(seconds, 1e-9):.1%} of one core).", "", f"![goodput]({plot_path.name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.bench_e3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sst2_minilm")
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--slo-factor", type=float, default=3.0, help="SLO as a multiple of the unloaded median")
    parser.add_argument("--loads", default="0.3,0.5,0.7,0.9,1.1,1.3",
                        help="offered loads as fractions of the original model's best saturated capacity")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load point's trace")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpu-load", type=float, default=0.7,
                        help="offered load, as a fraction of the original model's best capacity, at which the CPU "
                        "each process spends per request is measured")
    parser.add_argument("--instances", type=int, default=2, help="instances the plan may use (cores here)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args(argv)
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    inputs, _, _, _ = workload_inputs(args.dataset, args.data_dir, 2000)
    pool = len(next(iter(inputs.values())))
    vanilla, model, e3 = f"{args.model}_vanilla", args.model, f"{args.model}_e3"
    with running_stack(args.repository, models=[model, vanilla], with_controller=False, log_dir=out / "logs") as stack:
        warm = _take(inputs, np.arange(300))
        for name in (vanilla, model):  # first batches of each size run slower: not measured
            replay(stack.grpc_url, name, warm, poisson_arrivals(300, 50))
        v50 = _unloaded_median(stack, vanilla, inputs)
        slo_ms = args.slo_factor * v50
        hop_ms, plan, loaded = _plan_and_load(stack, args, slo_ms, inputs, warm)
        capacity: dict[str, float] = {}
        for layout in LAYOUTS:
            _relayout(stack, [vanilla, model], layout, warm)
            for system, name in (("vanilla", vanilla), ("apparate", model)):
                capacity[f"{system} {layout}"] = _capacity(stack, name, inputs)
        capacity["e3"] = _capacity(stack, e3, inputs)
        cpu_rate = args.cpu_load * max(v for k, v in capacity.items() if k.startswith("vanilla"))
        # the capacity loop ends in the 2x1 layout, E3's own (one single-threaded instance per core)
        cpu = cpu_per_request(stack, {"vanilla 2x1": vanilla, "apparate 2x1": model, "e3": e3}, inputs, cpu_rate,
                              args.seconds)
        original = np.array([a.label for a in replay(stack.grpc_url, vanilla, inputs, poisson_arrivals(pool, 50))])
        rates = [float(f) * max(v for k, v in capacity.items() if k.startswith("vanilla"))
                 for f in args.loads.split(",")]
        print(f"plan: exits {plan.exits}; capacity {capacity}; offered {[round(r) for r in rates]}", flush=True)
        controller = start_controller(stack.redis_url, out / "logs", CONTROLLER_ARGS)
        blocks = [name for name in loaded if name != e3]
        before = _block_stats(stack, blocks)
        sweeper = Sweeper(stack, inputs, rates, args.seconds, slo_ms)
        started = time.perf_counter()
        for repeat in range(args.repeats):
            layouts = list(LAYOUTS) if repeat % 2 == 0 else list(LAYOUTS)[::-1]
            if repeat % 2:
                sweeper.run("e3", e3, repeat)
            for layout in layouts:
                _relayout(stack, [vanilla, model], layout, warm)
                for system, name in (("vanilla", vanilla), ("apparate", model)):
                    sweeper.run(f"{system} {layout}", name, repeat)
            if not repeat % 2:
                sweeper.run("e3", e3, repeat)
        seconds = time.perf_counter() - started
        controller_cpu = controller.cpu_seconds()
        controller.stop()
        in_force = read_plan(redis.Redis.from_url(stack.redis_url), RedisKeys(e3)) or plan
        after = _block_stats(stack, blocks)
        stats = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in blocks}
    points = sweeper.points
    path = plot(points, slo_ms, out)
    text = report(args, slo_ms, v50, capacity, hop_ms, plan, points, original, stats, sweeper.routed[e3], controller_cpu,
                  seconds, path, (cpu_rate, cpu), in_force)
    (out / "e3_report.md").write_text(text, encoding="utf-8")
    (out / "e3_points.json").write_text(json.dumps(
        [{"system": p.system, "offered": p.offered, "repeat": p.repeat, "goodput": p.goodput(slo_ms)}
         for p in points], indent=1), encoding="utf-8")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
