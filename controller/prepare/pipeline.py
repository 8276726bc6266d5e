"""Preparation pipeline: trace → cut points → candidate ramps → training → export → profiling → initial ramp set.

Produces two model-repository entries that share one code path in the backend: ``<name>`` (blocks cut at every
candidate and all candidate ramps) and ``<name>_vanilla`` (the whole model as one block, no ramps).
"""

from __future__ import annotations

import inspect
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from controller.guard import AccuracyGuard
from controller.latency import LatencyModel
from controller.prepare.blocks import BlockPlan, export_block, plan_blocks
from controller.prepare.cutpoints import CutPoint, find_cut_points, localize_symbolic_scalars, split_at
from controller.prepare.profiling import profile_model
from controller.prepare.ramp_training import collect_reduced, train_ramps
from controller.prepare.triton_config import render_config
from controller.tuner import ThresholdTuner, TunerSettings, evaluate, is_held_out, tune_held_out
from early_exit.exit_rule import NEVER_EXIT
from early_exit.manifest import MANIFEST_FILE, BlockSpec, Manifest, RampSpec, TensorSpec, sha256_of
from early_exit.model_config import InstanceKind, vanilla_twin
from early_exit.ramps import build_ramp, ramp_arch_for
from early_exit.runtime import EarlyExitModel, ramp_state_key, strip_runtime_asserts

LOGGER = logging.getLogger(__name__)

#: What every candidate ramp and the final layer said on the validation split (``confidence``, ``prediction``
#: ``[R, N]``, ``final`` ``[N]``), kept beside the manifest so exits can be planned later without the data (E3).
VALIDATION_FILE = "validation.npz"

Batches = Callable[[], Iterator[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class PrepareSettings:
    """Args:
    max_batch_size: Triton ``max_batch_size`` and the largest profiled batch.
    overhead_budget: initial ramps may add at most this fraction to the vanilla latency at ``reference_batch``.
    guard: the accuracy guard the initial thresholds must pass on the validation split (the controller's, so it
        does not withdraw them on its first round).
    ramp_epochs: ramp training epochs over the bootstrap training split.
    reference_batch: batch size used to weigh latencies when choosing the initial ramps.
    seed: seeds ramp initialisation and training order.
    instance_kind: Triton instance kind of both entries. Latency is profiled on the device that kind serves on (the
        profile chooses the initial ramps and steers the controller, and it does not carry across devices), so
        ``KIND_GPU`` needs this machine to have the serving GPU.
    """

    max_batch_size: int = 32
    overhead_budget: float = 0.02
    guard: AccuracyGuard = AccuracyGuard()
    ramp_epochs: int = 100
    reference_batch: int = 8
    seed: int = 0
    instance_kind: InstanceKind = "KIND_CPU"


@dataclass(frozen=True)
class RampReport:
    """Summary row of one candidate ramp."""

    ramp_id: int
    label: str
    depth: float
    cost_ms: float
    accuracy: float
    answerable: float  # share of validation samples it could answer alone within the budget (its best threshold)
    exit_rate: float
    chosen: bool


def answerable_share(confidence: np.ndarray, agrees: np.ndarray, floor: float) -> float:
    """Largest share of samples a ramp could answer by itself with agreement ``>= floor`` (point estimate): its most
    confident samples, as many as keep their agreement at the floor. A ramp's ceiling, whatever the other ramps do:
    what its depth can save at most is this share."""
    ranked = agrees[np.argsort(-confidence, kind="stable")]
    within = np.nonzero(np.cumsum(ranked) >= floor * np.arange(1, len(ranked) + 1))[0]
    return float((within[-1] + 1) / len(ranked)) if len(within) else 0.0


def trace(model: nn.Module, example: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """Export ``model`` (inputs passed positionally, in ``example``'s order) with a dynamic batch dimension on every
    input and return its ATen graph module."""
    batch = torch.export.Dim("batch", min=1)
    dynamic: tuple = tuple({0: batch} for _ in example)
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        dynamic = (dynamic,)  # one entry for the *inputs varargs
    program = torch.export.export(model.eval(), tuple(example.values()), dynamic_shapes=dynamic, strict=False)
    return localize_symbolic_scalars(strip_runtime_asserts(program.module()))


def _export_entry(
    out_dir: Path,
    name: str,
    inputs: Sequence[TensorSpec],
    classes: int,
    plans: Sequence[BlockPlan],
    example: dict[str, torch.Tensor],
    ramps: Sequence[tuple[RampSpec, nn.Module]],
    max_batch_size: int,
    instance_kind: InstanceKind,
) -> Manifest:
    """Write ``config.pbtxt`` and ``1/`` (blocks, ramps, manifest without profile) for one entry."""
    version = out_dir / "1"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    version.mkdir(parents=True)
    values = dict(example)
    blocks: list[BlockSpec] = []
    for index, plan in enumerate(plans):
        args = [values[n] for n in plan.inputs]
        with torch.no_grad():
            outputs = plan.module(*args)
        values.update(zip(plan.outputs, outputs))
        file = f"block_{index}.pt2"
        export_block(plan, args, version / file)
        blocks.append(BlockSpec(file, tuple(plan.inputs), tuple(plan.outputs), sha256_of(version / file)))
    weights = None
    if ramps:
        state = {
            ramp_state_key(spec.id) + key: tensor.detach().contiguous()
            for spec, module in ramps
            for key, tensor in module.state_dict().items()
        }
        weights = "ramps.safetensors"
        save_file(state, str(version / weights))
    manifest = Manifest(
        name=name,
        classes=classes,
        inputs=tuple(inputs),
        blocks=tuple(blocks),
        ramps=tuple(spec for spec, _ in ramps),
        ramp_weights=weights,
        ramp_weights_sha256=sha256_of(version / weights) if weights else None,
    )
    manifest.validate()
    (version / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    config = render_config(name, inputs, classes, max_batch_size, instance_kind=instance_kind)
    (out_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    return manifest


def profiling_device(instance_kind: InstanceKind) -> torch.device:
    """The device an entry of ``instance_kind`` serves on, where its latency must be measured."""
    if instance_kind == "KIND_CPU":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("instance kind KIND_GPU: latency must be profiled on the serving GPU, and this machine has no "
                         "CUDA device (or torch was built without CUDA)")
    return torch.device("cuda")


def _batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _make_inputs(example: dict[str, torch.Tensor]) -> Callable[[int], dict[str, torch.Tensor]]:
    def make(batch_size: int) -> dict[str, torch.Tensor]:
        repeats = -(-batch_size // next(iter(example.values())).shape[0])
        return {k: v.repeat(repeats, *([1] * (v.dim() - 1)))[:batch_size] for k, v in example.items()}

    return make


@torch.no_grad()
def _validate_ramps(
    model: EarlyExitModel, batches: Batches
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence and prediction of every candidate ramp ``[R, N]`` and the final prediction ``[N]``."""
    confidence: list[np.ndarray] = []
    prediction: list[np.ndarray] = []
    final: list[np.ndarray] = []
    every = list(range(len(model.manifest.ramps)))
    for batch in tqdm(batches(), desc="validate ramps", unit="batch"):
        verdicts = list(model.stages(batch, every))
        confidence.append(np.stack([v.confidence for v in verdicts[:-1]]))
        prediction.append(np.stack([v.prediction for v in verdicts[:-1]]))
        final.append(verdicts[-1].prediction)
    return np.concatenate(confidence, 1), np.concatenate(prediction, 1), np.concatenate(final)


def choose_initial_ramps(
    latency: LatencyModel,
    confidence: np.ndarray,
    prediction: np.ndarray,
    final: np.ndarray,
    guard: AccuracyGuard,
    overhead_budget: float,
    ramp_ids: Sequence[int] | None = None,
    objective: Literal["assured", "mean"] = "assured",
) -> dict[int, float]:
    """Initial ramp set under the overhead budget, chosen forward stepwise, and its thresholds tuned jointly on half
    the validation split and certified by the guard on the other half (``tune_held_out``, the controller's rule).

    Each step adds the candidate (row ``i`` of ``confidence`` and ``prediction`` is ramp ``ramp_ids[i]``, by default
    ramp ``i``) whose set, with jointly tuned thresholds, offers the largest saving, while that saving keeps
    improving. For requests answered once, the saving is the assured one (the smaller of the mean and the median
    sample's, ``Evaluation.assured_saving_ms``): ranking ramps alone by mean saving per millisecond of overhead, as
    before, filled ResNet-56's budget with four ramps at 41-52 % depth that 38 % of inputs take, the median request
    paid for four heads, and the controller measured a loss and switched the exits off
    (``docs/benchmarks/cifar10_resnet56``). A generated stream's time per token averages over its tokens, so token
    exits are chosen by the ``mean``.

    Why certified on held-out samples: thresholds tuned and judged on the same samples stop exactly at the guard's
    edge there, and serve less on any other inputs. Tuned on all of MiniLM's 3,369 validation sentences, the initial
    thresholds served 98.75-98.85 % agreement in four benchmark runs, over the 1 % budget they were tuned for. The
    ramps are still ranked by in-sample tuning: each step compares sets on the same samples, so the optimism is
    shared, and one certification at the end costs a few climbs instead of a few per candidate.
    """
    ids = list(range(confidence.shape[0])) if ramp_ids is None else list(ramp_ids)
    tuner = ThresholdTuner(TunerSettings(guard=guard))
    correct = prediction == final[None, :]
    chosen: list[int] = []  # rows, in depth order
    best_saving = 0.0
    while True:
        step: tuple[float, list[int]] | None = None
        for row in (r for r in range(len(ids)) if r not in chosen):
            trial = sorted([*chosen, row])
            trial_ids = [ids[r] for r in trial]
            if latency.overhead_fraction(trial_ids) > overhead_budget:
                continue
            exit_ms = latency.exit_latencies(trial_ids)
            thresholds = tuner.tune(confidence[trial], prediction[trial], final, exit_ms)
            evaluation = evaluate(thresholds, confidence[trial], correct[trial], exit_ms)
            heads_ms = exit_ms[-1] - latency.vanilla_ms  # what the set's ramps add to a pass that does not exit
            saving = (evaluation.assured_saving_ms if objective == "assured" else evaluation.saving_ms) - heads_ms
            if step is None or saving > step[0]:
                step = (saving, trial)
        if step is None or step[0] <= best_saving:
            break
        best_saving, chosen = step[0], step[1]
    if not chosen:
        return {}
    held_out = is_held_out(np.arange(len(final)))
    certified = tune_held_out(TunerSettings(guard=guard), confidence[chosen], prediction[chosen], final,
                              latency.exit_latencies([ids[r] for r in chosen]), held_out)
    if certified is None:
        return {}
    # A ramp the joint tuning keeps closed only costs latency; the controller can still add it back later.
    return {ids[r]: float(t) for r, t in zip(chosen, certified) if t < NEVER_EXIT}


def prepare(
    model: nn.Module,
    name: str,
    inputs: Sequence[TensorSpec],
    primary_input: str,
    classes: int,
    train_batches: Batches,
    validation_batches: Batches,
    repository: Path,
    settings: PrepareSettings,
) -> tuple[Manifest, list[RampReport]]:
    """Build ``repository/<name>`` and ``repository/<name>_vanilla``; returns the manifest and a per-ramp report."""
    device = profiling_device(settings.instance_kind)  # fail before the slow steps
    torch.manual_seed(settings.seed)
    example = next(train_batches())
    example = {k: v[: min(len(v), 7)] for k, v in example.items()}  # an odd batch: no accidental size equalities
    graph = trace(model, example)
    cuts: list[CutPoint] = find_cut_points(graph.graph, [t.name for t in inputs].index(primary_input))
    LOGGER.info("found %d cut points: %s", len(cuts), ", ".join(c.node for c in cuts))
    plans = plan_blocks(split_at(graph, cuts), cuts, [t.name for t in inputs])

    def features(batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        values = dict(batch)
        for plan in plans:
            values.update(zip(plan.outputs, plan.module(*(values[n] for n in plan.inputs))))
        return [values[p.outputs[0]] for p in plans[:-1]], values[plans[-1].outputs[0]]

    mask_input = next((t.name for t in inputs if "mask" in t.name.lower() and len(t.shape) == 1), None)
    with torch.no_grad():
        archs = [ramp_arch_for(f, classes, mask_input) for f in features(example)[0]]
    ramp_modules = [build_ramp(arch) for arch in archs]
    data = collect_reduced(features, ramp_modules, [arch.get("inputs", []) for arch in archs], train_batches())
    train_ramps(ramp_modules, data, epochs=settings.ramp_epochs, seed=settings.seed)
    ramp_specs = [
        RampSpec(i, i, arch, label=f"{cut.node} ({cut.depth:.0%} of FLOPs)")
        for i, (cut, arch) in enumerate(zip(cuts, archs))
    ]
    entry = repository / name
    manifest = _export_entry(
        entry, name, inputs, classes, plans, example, list(zip(ramp_specs, ramp_modules)), settings.max_batch_size,
        settings.instance_kind,
    )
    vanilla_plan = plan_blocks(split_at(graph, []), [], [t.name for t in inputs])
    vanilla_entry = repository / vanilla_twin(name)
    vanilla = _export_entry(
        vanilla_entry, vanilla_entry.name, inputs, classes, vanilla_plan, example, [], settings.max_batch_size,
        settings.instance_kind,
    )

    sizes = _batch_sizes(settings.max_batch_size)
    served = EarlyExitModel(entry / "1", device)
    profile = profile_model(served, _make_inputs(example), sizes)
    vanilla_profile = profile_model(EarlyExitModel(vanilla_entry / "1", device), _make_inputs(example), sizes)
    latency = LatencyModel.from_manifest(replace(manifest, profile=profile), settings.reference_batch)
    confidence, prediction, final = _validate_ramps(served, validation_batches)
    np.savez_compressed(entry / "1" / VALIDATION_FILE, confidence=confidence, prediction=prediction, final=final)
    initial = choose_initial_ramps(latency, confidence, prediction, final, settings.guard, settings.overhead_budget)
    manifest = replace(manifest, profile=profile, initial_thresholds=initial)
    (entry / "1" / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    vanilla = replace(vanilla, profile=vanilla_profile)
    (vanilla_entry / "1" / MANIFEST_FILE).write_text(vanilla.to_json(), encoding="utf-8")

    active = sorted(initial)
    rates = evaluate(
        np.array([initial[r] for r in active]), confidence[active], prediction[active] == final[None, :],
        latency.exit_latencies(active),
    ).exit_rates
    reports = [
        RampReport(spec.id, cut.node, cut.depth, float(latency.ramp_ms[spec.id]),
                   float((prediction[spec.id] == final).mean()),
                   answerable_share(confidence[spec.id], prediction[spec.id] == final, settings.guard.floor),
                   float(rates[active.index(spec.id)]) if spec.id in initial else 0.0, spec.id in initial)
        for spec, cut in zip(manifest.ramps, cuts)
    ]
    return manifest, reports
