"""``make bench-e3``: goodput of the original model, Apparate mode and E3 mode on the same cores, trace and SLO.

Goodput is what E3 is for: requests answered correctly-formed within the latency objective (SLO) per second. The
SLO is ``--slo-factor`` times the original model's unloaded median latency, measured first in the same run. Then:

1. the cost of a router-to-block hop is measured: an E3 entry cut in two at its middle ramp, that exit closed, against
   the original model, both replaying the same Poisson trace at ``--cpu-load`` in alternation, three times; the
   median difference in the CPU the server's processes spend per request, per hop, converted to the unit of the
   profile the planner weighs it against, is the hop the planner must pay for (capacity bursts, used before, spread
   the same figure from 0.55 to 1.53 ms an hour apart);
2. the planner chooses the exits, batch size and replicas for that SLO and hop cost, and the E3 entries are
   (re)loaded through Triton's model-control API;
3. the controller starts, and both early-exit entries serve other inputs of the same distribution (never measured)
   at ``--cpu-load``: the E3 router traces every sample of its warm-up (``early_exit.tracing``), so the controller
   tunes both entries on served traffic before anything is measured, as in the first minutes of a deployment;
4. every system replays Poisson traces of the same inputs at offered loads from below to well above the original
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

from controller.config_store import read_config, read_plan
from controller.guard import wilson_lower
from controller.prepare.e3 import main as plan_e3
from early_exit.e3_plan import PLAN_FILE, E3Plan
from early_exit.keys import RedisKeys
from early_exit.manifest import Profile, load_manifest
from early_exit.model_config import vanilla_twin
from workload.bench import CONTROLLER_ARGS, Inputs, _set_config, workload_inputs
from workload.client import Answer, measure_capacity, poisson_arrivals, replay
from workload.stack import ROOT, Stack, cpu_used, running_stack


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
        """Each load point takes the pool's next inputs, so the loads see different inputs (a load point that
        replayed the pool's first inputs again measured agreement on the same few hundred every time) and every
        system sees the same inputs at the same load."""
        pool = len(next(iter(self.inputs.values())))
        start = 0
        for rate in self.rates:
            count = int(rate * self.seconds)
            arrivals = poisson_arrivals(count, rate, seed=10 * repeat + int(rate))
            index = (start + np.arange(count)) % pool
            start += count
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
    blocks = plan.block_models(e3)
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


@dataclass(frozen=True)
class HopCost:
    """What one router-to-block hop costs.

    ``pairs``: ms of server CPU per request and hop, each the cost of an E3 entry cut in two with its exit closed
    (the router runs the first group, then ``hops`` block models, each a hop with the hidden state travelling to it)
    minus the original model's on the same trace at ``rate`` requests per second, divided by ``hops``: the router's
    own bookkeeping is charged to the hop, which a plan with one hop pays once. ``scale``: the original model's
    profiled time per sample (the unit of the planner's block costs: ``prepare``'s in-process profile, taken with
    torch's default threads) over the CPU its stub measured per request on those traces, at the batch sizes they
    had. The planner weighs a hop against profiled block times, so it takes the hop in that unit (``planner_ms``): a
    CPU millisecond of a single-threaded instance is not a profiled millisecond of a two-threaded one (measured on
    MiniLM: 0.38-0.40 of it).
    """

    pairs: tuple[float, ...]
    rate: float
    scale: float
    hops: int

    @property
    def cpu_ms(self) -> float:
        return max(0.0, float(np.median(self.pairs)))

    @property
    def planner_ms(self) -> float:
        return self.cpu_ms * self.scale


def measure_hop(stack: Stack, e3: str, vanilla: str, inputs: Inputs, rate: float, seconds: float,
                profile: Profile, hops: int, repeats: int = 5) -> HopCost:
    """Server CPU per request (Triton's process and every stub; not this client) of the E3 entry ``e3`` (``hops``
    block models, every exit closed) minus the original model's, per hop, measured in alternation ``repeats`` times
    at ``rate``; ``profile`` is the original model's (``HopCost.scale``).

    CPU seconds are counted at a load where the machine is not saturated, so the machine's drift between the two
    measurements of a pair is small against the hop, and the batches are the small ones an SLO allows. Both must
    batch alike (no queue delay on either), or the difference measures batching, not the hop."""
    pairs, stub_ms = [], []
    before = _block_stats(stack, [vanilla])[vanilla]
    for _ in range(repeats):
        costs = cpu_per_request(stack, {"e3": e3, "vanilla": vanilla}, inputs, rate, seconds)
        server = {system: sum(ms for process, ms in cost.items() if process != "client")
                  for system, cost in costs.items()}
        pairs.append((server["e3"] - server["vanilla"]) / hops)
        stub_ms.append(costs["vanilla"][vanilla])
    after = _block_stats(stack, [vanilla])[vanilla]
    batch = (after[0] - before[0]) / max(1, after[1] - before[1])
    profiled = float(profile.at(batch)[0].sum()) / batch
    return HopCost(tuple(pairs), rate, profiled / float(np.median(stub_ms)), hops)


def _middle_ramp(repository: Path, model: str) -> int:
    """The candidate ramp nearest half the model's profiled time: where the hop measurement cuts it in two."""
    manifest = load_manifest(repository / model / "1")
    assert manifest.profile is not None, f"{model} has no latency profile: run prepare again"
    blocks, _ = manifest.profile.at(1)
    done = np.cumsum(blocks) / blocks.sum()
    return min(manifest.ramps, key=lambda ramp: abs(done[ramp.after_block] - 0.5)).id


def _plan_and_load(stack: Stack, args: argparse.Namespace, slo_ms: float, inputs: Inputs,
                   warm: Inputs) -> tuple[HopCost, E3Plan, list[str]]:
    """Measure the hop cost with an E3 entry cut in two, its exit closed, against the original model in the same
    layout (one single-threaded instance per core), then plan for the SLO and that cost and load the plan.

    Two groups, not one: the hop between them carries the hidden state, which a one-group entry never ships (measured
    on MiniLM when the router called a block model for every group, one group: 1.2 ms per hop, and a four-group plan
    modelled on it spent 8 % less CPU per request than the original model instead of the 33 % modelled)."""
    model, e3, vanilla = args.model, f"{args.model}_e3", vanilla_twin(args.model)
    common = ["--name", model, "--repository", str(args.repository), "--slo-ms", f"{slo_ms:.3f}",
              "--instances", str(args.instances)]
    plan_e3([*common, "--exits", str(_middle_ramp(args.repository, model)), "--warmup-traced", "0"])
    # a CPU plan batches as the original model does (whatever is queued, no waiting): a queue delay would buy the E3
    # entry larger batches, cheaper per sample, and hide the hop (measured: -0.1 to -0.5 ms at 98 req/s)
    loaded = _load_e3(stack, args.repository, model, [])
    client = redis.Redis.from_url(stack.redis_url)
    _set_config(client, e3, {})  # every exit closed: every sample makes the hop
    replay(stack.grpc_url, e3, warm, poisson_arrivals(len(next(iter(warm.values()))), 50))
    _relayout(stack, [vanilla], "2x1", warm)
    profile = load_manifest(args.repository / vanilla / "1").profile
    assert profile is not None, f"{vanilla} has no latency profile: run prepare again"
    hop = measure_hop(stack, e3, vanilla, inputs, args.cpu_load * _capacity(stack, vanilla, inputs), args.seconds,
                      profile, len(loaded) - 1)
    print(f"SLO {slo_ms:.1f} ms; hop {hop.cpu_ms:.3f} ms of CPU (pairs {', '.join(f'{p:.3f}' for p in hop.pairs)} "
          f"at {hop.rate:.0f} req/s), {hop.planner_ms:.3f} profiled ms", flush=True)
    plan_e3([*common, "--hop-ms", f"{hop.planner_ms:.4f}"])
    plan = E3Plan.from_json((args.repository / e3 / "1" / PLAN_FILE).read_text())
    loaded = _load_e3(stack, args.repository, model, loaded)
    _set_config(client, e3, plan.thresholds)  # the closed exit above is in Redis, and routers follow Redis
    replay(stack.grpc_url, e3, warm, poisson_arrivals(len(next(iter(warm.values()))), 50))
    return hop, plan, loaded


def _settle(stack: Stack, names: list[str], inputs: Inputs, rate: float) -> None:
    """Serve ``inputs`` to each of ``names`` at ``rate`` with the controller running, before anything is measured."""
    count = len(next(iter(inputs.values())))
    for name in names:
        started = time.perf_counter()
        replay(stack.grpc_url, name, inputs, poisson_arrivals(count, rate, seed=7), timeout=600)
        print(f"warm-up: {count} requests to {name} at {rate:.0f} req/s in {time.perf_counter() - started:.0f} s; "
              f"thresholds {_thresholds(stack, name)}", flush=True)


def _thresholds(stack: Stack, name: str) -> dict[int, float]:
    config = read_config(redis.Redis.from_url(stack.redis_url), RedisKeys(name))
    return {} if config is None else {r: round(t, 3) for r, t in config.thresholds.items()}


def cpu_per_request(stack: Stack, systems: dict[str, str], inputs: Inputs, rate: float,
                    seconds: float, settle: float = 1.0) -> dict[str, dict[str, float]]:
    """CPU milliseconds per request of every process taking part (this client, Triton's own process, each model's
    stubs) while one Poisson trace at ``rate`` is replayed against each system in turn: what a request costs at the
    batch sizes that load gives, where the capacity bursts give the largest. Each system is charged for ``settle``
    seconds after its last answer too: work it left running (an Apparate entry's deferred tails, E3's traced samples)
    is its own, not the next system's. Keys: system, then process."""
    count = int(rate * seconds)
    sample = _take(inputs, np.arange(count) % len(next(iter(inputs.values()))))
    triton = stack.process("triton")
    costs = {}
    for system, name in systems.items():
        before, client = triton.cpu_by_process(), time.process_time()
        replay(stack.grpc_url, name, sample, poisson_arrivals(count, rate, seed=7))
        client = time.process_time() - client
        time.sleep(settle)
        used = {"client": client, **cpu_used(before, triton.cpu_by_process())}
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


def _agreement(points: list[LoadPoint], original: np.ndarray) -> tuple[int, int]:
    """Answers of ``points`` that agree with the original model's, and answers (errors excluded)."""
    labels = [(a.label, original[a.index % len(original)]) for p in points for a in p.answers if a.error is None]
    return sum(label == expected for label, expected in labels), len(labels)


def report(args: argparse.Namespace, slo_ms: float, v50: float, capacity: dict[str, float], hop: HopCost,
           plan: E3Plan, points: list[LoadPoint], original: np.ndarray, stats: dict[str, tuple[int, int]],
           requests: int, controller_cpu: float, seconds: float, plot_path: Path,
           cpu: tuple[float, dict[str, dict[str, float]]], in_force: E3Plan,
           warmup: tuple[int, dict[int, float], dict[int, float]]) -> str:
    best = {system: max(p.goodput(slo_ms) for p in points if p.system == system)
            for system in dict.fromkeys(p.system for p in points)}
    lines = [
        f"# E3 goodput benchmark: {args.model}\n",
        f"SLO {slo_ms:.1f} ms = {args.slo_factor:g} x the original model's unloaded median ({v50:.2f} ms). "
        f"Saturated capacity (closed loop, median of 3): "
        + ", ".join(f"{k} {v:.0f} req/s" for k, v in capacity.items()) + ".",
        f"Hop cost: {hop.cpu_ms:.3f} ms of server CPU per sample and hop (an E3 entry of {hop.hops + 1} block groups, "
        f"the first in the router, with its exit closed against the original model at {hop.rate:.0f} req/s, per hop, "
        f"median of {len(hop.pairs)} alternating pairs: "
        + ", ".join(f"{p:.3f}" for p in hop.pairs) + f" ms); {hop.planner_ms:.3f} ms in the profile's unit, which "
        f"the planner took (x{hop.scale:.2f}: the original model's profiled time per sample over its stub's CPU "
        "per request).\n",
        "## Best goodput over the offered loads (both repeats)\n",
        "Agreement with the original model over every answer of the system (all loads and repeats; each load point "
        "takes the next inputs of the pool, so one load point's agreement rests on a few hundred inputs), with its "
        "95 % Wilson interval.\n",
        "| system | goodput req/s | vs best original | vs best Apparate mode | agreement, all answers "
        "| 95 % interval |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    top = {kind: max(v for k, v in best.items() if k.startswith(kind)) for kind in ("vanilla", "apparate")}
    for system, value in best.items():
        agreeing, answered = _agreement([p for p in points if p.system == system], original)
        low, high = (float(wilson_lower(agreeing, answered, z)) for z in (1.96, -1.96))
        lines.append(f"| {system} | {value:.1f} | {value / top['vanilla']:.2f}x | {value / top['apparate']:.2f}x | "
                     f"{agreeing / answered:.2%} of {answered} | {low:.2%}-{high:.2%} |")
    lines += ["", "## Every load point\n",
              "| offered req/s | system | repeat | goodput req/s | p50 ms | p99 ms | errors | agreement with original |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.offered, p.system, p.repeat)):
        lat = p.latencies()
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2)
        agreeing, answered = _agreement([p], original)
        agree = agreeing / max(answered, 1)
        errors = sum(a.error is not None for a in p.answers)
        lines.append(f"| {p.offered:.0f} | {p.system} | {p.repeat} | {p.goodput(slo_ms):.1f} | {p50:.1f} | "
                     f"{p99:.1f} | {errors} | {agree:.2%} |")
    rate, costs = cpu
    processes = list(dict.fromkeys(k for used in costs.values() for k in used))
    lines += ["", f"## CPU per request at {rate:.0f} req/s offered (Poisson; the controller runs, not counted)\n",
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
              f"({expected.get('capacity_gain', 0):.2f}x), validation agreement {expected.get('agreement', 0):.2%}. "
              f"Thresholds in force after the warm-up (before anything was measured, the controller tuned both "
              f"early-exit entries on {warmup[0]} other inputs each, the E3 router tracing every sample of its "
              f"warm-up): {warmup[1]}; at the end of the sweep: {warmup[2]}.",
              "", "| model (the router runs the first group) | blocks | exit | modelled survivors | observed survivors "
              "| average batch |",
              "|---|---|---|---:|---:|---:|"]
    e3 = f"{args.model}_e3"
    for k, (name, group) in enumerate(zip([e3, *plan.block_models(e3)], plan.groups)):
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
    inputs, others, _, _ = workload_inputs(args.dataset, args.data_dir, 2000)
    pool = len(next(iter(inputs.values())))
    vanilla, model, e3 = vanilla_twin(args.model), args.model, f"{args.model}_e3"
    with running_stack(args.repository, models=[model, vanilla], with_controller=False, log_dir=out / "logs") as stack:
        warm = _take(inputs, np.arange(300))
        for name in (vanilla, model):  # first batches of each size run slower: not measured
            replay(stack.grpc_url, name, warm, poisson_arrivals(300, 50))
        v50 = _unloaded_median(stack, vanilla, inputs)
        slo_ms = args.slo_factor * v50
        hop, plan, loaded = _plan_and_load(stack, args, slo_ms, inputs, warm)
        controller = stack.start_controller(out / "logs", CONTROLLER_ARGS)
        _settle(stack, [e3, model], others, hop.rate)
        settled = _thresholds(stack, e3)
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
        controller_before = controller.cpu_seconds()
        before = _block_stats(stack, loaded)
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
        controller_cpu = controller.cpu_seconds() - controller_before
        controller.stop()
        in_force = read_plan(redis.Redis.from_url(stack.redis_url), RedisKeys(e3)) or plan
        warmup = (len(next(iter(others.values()))), settled, _thresholds(stack, e3))
        after = _block_stats(stack, loaded)
        stats = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in loaded}
    points = sweeper.points
    path = plot(points, slo_ms, out)
    text = report(args, slo_ms, v50, capacity, hop, plan, points, original, stats, sweeper.routed[e3], controller_cpu,
                  seconds, path, (cpu_rate, cpu), in_force, warmup)
    (out / "e3_report.md").write_text(text, encoding="utf-8")
    (out / "e3_points.json").write_text(json.dumps(
        [{"system": p.system, "offered": p.offered, "repeat": p.repeat, "goodput": p.goodput(slo_ms)}
         for p in points], indent=1), encoding="utf-8")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
