"""``python -m controller.prepare.e3``: plan an E3 (throughput-mode) deployment of a prepared entry and write it.

Reads ``<repository>/<name>/1`` (manifest with its latency profile, and the validation split's per-ramp verdicts that
``prepare`` saved), chooses exits, batch size and replicas with ``controller.e3_planner``, and writes ``<name>_e3`` (the
router clients call, with ``plan.json``; it runs the first block group itself) and one ``<name>_e3_b<k>`` block model
per later group. The router and the block models load their blocks from ``<name>``'s version folder, so the Apparate
entry must be in the same repository.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from controller.e3_planner import Plan, PlannerSettings, make_plan
from controller.guard import AccuracyGuard
from controller.prepare.pipeline import VALIDATION_FILE
from controller.prepare.triton_config import ROUTER_BACKEND, render_config, render_pbtxt
from controller.tuner import TunerSettings
from early_exit.e3_plan import PLAN_FILE, BlockGroup, E3Plan
from early_exit.manifest import Manifest, TensorSpec
from early_exit.model_config import InstanceKind
from early_exit.runtime import EarlyExitModel
from early_exit.tracing import WARMUP_TRACED

LOGGER = logging.getLogger("controller.prepare.e3")


@torch.inference_mode()
def value_specs(model: EarlyExitModel) -> dict[str, TensorSpec]:
    """Per-sample shape and dtype of every value the blocks exchange, from one run on placeholder inputs (the block
    models' tensors must have fixed shapes for Triton's batcher to merge them)."""
    manifest = model.manifest
    values = {spec.name: torch.ones((2, *spec.shape), dtype=getattr(torch, spec.dtype)) for spec in manifest.inputs}
    for spec, block in zip(manifest.blocks, model.blocks):
        assert block is not None
        outputs = block(*(values[name] for name in spec.inputs))
        values.update(zip(spec.outputs, (outputs,) if isinstance(outputs, torch.Tensor) else outputs))
    return {name: TensorSpec(name, str(value.dtype).removeprefix("torch."), tuple(value.shape[1:]))
            for name, value in values.items()}


def block_groups(manifest: Manifest, plan: Plan, specs: dict[str, TensorSpec]) -> tuple[BlockGroup, ...]:
    groups = []
    for group in plan.groups:
        inputs, outputs = manifest.segment_values(group.first_block, group.last_block)
        side = manifest.ramps[group.ramp].arch.get("inputs", ()) if group.ramp is not None else ()
        carried = outputs if group.ramp is not None else ()
        groups.append(BlockGroup(group.first_block, group.last_block, group.ramp,
                                 tuple(specs[name] for name in dict.fromkeys([*inputs, *side])),
                                 tuple(specs[name] for name in carried), plan.batch_size, group.queue_delay_us,
                                 group.replicas))
    return tuple(groups)


def write_e3_entries(repository: Path, source: str, plan: E3Plan, manifest: Manifest,
                     hop_timeout_ms: float = 0.0, warmup_traced: int = WARMUP_TRACED) -> list[str]:
    """Write the router and its block models (replacing earlier ones); returns the entry names.

    The router runs the first group itself, on the batches its own batcher forms (the plan's first queue delay,
    which the planner leaves at zero: the router's workers merge whatever waits while they are busy), and a client's
    own batch may be as large as the Apparate entry takes. It runs on the plan's instance kind, so a GPU plan runs its
    first group on a GPU. On a CPU each replica of the first group is a router instance (a process of its own): the
    worker threads of one process share Python's lock, which a model of many small operators pays for (ResNet-56 at
    117 req/s: E3's median 23.2 ms against the original model's 13.7 with two worker threads in one router, 20.4
    against 18.2 with two routers). Block
    models are configured by ``E3Plan.block_model_config``, as the router configures them when the controller
    re-sizes them.
    """
    name = f"{source}_e3"
    for stale in repository.glob(f"{name}_b*"):
        shutil.rmtree(stale)
    router = repository / name
    (router / "1").mkdir(parents=True, exist_ok=True)
    (router / "1" / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    first = plan.groups[0]
    (router / "config.pbtxt").write_text(render_config(
        name, manifest.inputs, manifest.classes, plan.max_batch_size, max_queue_delay_us=first.queue_delay_us,
        instance_kind=plan.instance_kind, backend=ROUTER_BACKEND,
        parameters={"hop_timeout_ms": f"{hop_timeout_ms:g}", "max_in_flight": "256",
                    "warmup_traced": str(warmup_traced)},
        preferred_batch_size=first.batch_size,
        instances=first.replicas if plan.instance_kind == "KIND_CPU" else 1), encoding="utf-8")
    entries = [name]
    for index, block in enumerate(plan.block_models(name), start=1):
        (repository / block / "1").mkdir(parents=True, exist_ok=True)
        config = render_pbtxt(plan.block_model_config(name, index, manifest.classes))
        (repository / block / "config.pbtxt").write_text(config, encoding="utf-8")
        entries.append(block)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.prepare.e3",
        description="Plan the E3 (throughput-mode) deployment of a prepared entry: choose the exits that split it "
        "into block models, their batch size and replicas, and write <name>_e3 (router) and <name>_e3_b<k>.",
    )
    parser.add_argument("--name", required=True, help="the prepared Apparate entry, e.g. sst2_minilm")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--slo-ms", type=float, default=100.0,
                        help="latency objective of a request, serving overheads included (make bench-e3 uses 3x the "
                        "original model's unloaded median)")
    parser.add_argument("--instances", type=int, default=2, help="CPU cores (every block model then gets one "
                        "single-threaded instance per core) or GPUs (shared out among the block models by compute)")
    parser.add_argument("--max-exits", type=int, default=PlannerSettings.max_exits)
    parser.add_argument("--exits", default=None,
                        help="comma-separated ramp ids to split at (default: the planner chooses; '' for none)")
    parser.add_argument("--hop-ms", type=float, default=PlannerSettings.hop_ms,
                        help="cost of one router-to-block call per sample, in the profile's unit (ms of the in-process "
                        "profile at torch's default threads; make bench-e3 measures and converts it)")
    parser.add_argument("--sample-rate", type=float, default=PlannerSettings.sample_rate,
                        help="share of samples traced to the final layer after exiting, for feedback")
    parser.add_argument("--warmup-traced", type=int, default=WARMUP_TRACED,
                        help="samples each router replica traces in full after loading, so the controller checks the "
                        "plan's thresholds on served traffic from the start (0: only the sampled share)")
    parser.add_argument("--accuracy-budget", type=float, default=AccuracyGuard.budget)
    parser.add_argument("--z", type=float, default=AccuracyGuard.z)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--instance-kind", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args(argv)
    if args.warmup_traced < 0:
        parser.error("--warmup-traced must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = args.repository / args.name / "1"
    model = EarlyExitModel(directory)
    manifest = model.manifest
    validation = directory / VALIDATION_FILE
    if not validation.is_file():
        parser.error(f"{validation} is missing: prepare the entry again (prepare saves it)")
    if manifest.profile is None:
        parser.error(f"{directory} has no latency profile")
    with np.load(validation) as data:
        confidence, prediction, final = data["confidence"], data["prediction"], data["final"]
    slo_ms = args.slo_ms
    settings = PlannerSettings(slo_ms, args.instances, shared_cores=args.instance_kind == "cpu",
                               max_exits=args.max_exits, hop_ms=args.hop_ms, profile_threads=torch.get_num_threads(),
                               sample_rate=args.sample_rate,
                               tuner=TunerSettings(guard=AccuracyGuard(args.accuracy_budget, args.z)))
    exits = None if args.exits is None else tuple(int(r) for r in args.exits.split(",") if r.strip())
    plan = make_plan(manifest, confidence, prediction, final, settings, exits)
    groups = block_groups(manifest, plan, value_specs(model))
    expected = {"batch_size": plan.batch_size, "cost_ms": plan.cost_ms, "vanilla_cost_ms": plan.vanilla_cost_ms,
                "capacity_gain": plan.capacity_gain, "latency_ms": plan.latency_ms, "agreement": plan.agreement,
                "survivors": [g.survivors for g in plan.groups], "hop_ms": args.hop_ms,
                "instances": args.instances}
    kind: InstanceKind = "KIND_GPU" if args.instance_kind == "gpu" else "KIND_CPU"
    e3 = E3Plan(args.name, groups, plan.thresholds, args.sample_rate, slo_ms, expected, instance_kind=kind,
                threads=plan.threads if kind == "KIND_CPU" else 0, max_batch_size=args.max_batch_size,
                planner=settings.sizing_fields(), origin=uuid.uuid4().hex)
    e3.validate(manifest)
    entries = write_e3_entries(args.repository, args.name, e3, manifest, slo_ms, args.warmup_traced)
    print(f"exits {list(e3.exits)} (thresholds {', '.join(f'{t:.3f}' for t in plan.thresholds.values())}), "
          f"batch {plan.batch_size}, replicas {[g.replicas for g in plan.groups]}, "
          f"survivors {', '.join(f'{g.survivors:.0%}' for g in plan.groups)}; modelled compute per request "
          f"{plan.cost_ms:.3f} ms vs {plan.vanilla_cost_ms:.3f} ms vanilla ({plan.capacity_gain:.2f}x), "
          f"validation agreement {plan.agreement:.2%}, full-depth latency {plan.latency_ms:.1f} ms of {slo_ms:.1f}")
    print(f"wrote {', '.join(str(args.repository / e) for e in entries)}")
    if len(plan.groups) == 1 or plan.capacity_gain <= 1.0:
        LOGGER.warning("%s: the cheapest E3 plan computes %.2fx as much per request as the original model (hop %.3f "
                       "ms per sample): E3 saves no compute on this model here; serve the Apparate entry or the "
                       "original model for throughput", args.name, 1.0 / plan.capacity_gain, args.hop_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
