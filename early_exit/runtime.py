"""Run a ramp-augmented model block by block, yielding each active ramp's verdict as soon as it is known.

The same runtime serves requests in the Triton backend and measures latency during preparation, so profiled numbers
describe exactly the code that serves.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import fx, nn
from torch.export.passes import move_to_device_pass

from early_exit.errors import ArtifactError
from early_exit.manifest import BlockSpec, Manifest, load_manifest
from early_exit.ramps import build_ramp

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextmanager
def _weights_only_loading() -> Iterator[None]:
    """Forbid full unpickling while loading an exported program.

    ``torch.export.load`` reads tensors with ``torch.load(weights_only=True)`` but falls back to unrestricted pickle
    when that fails; forcing weights-only turns a tampered artifact into a load error instead of code execution.
    """
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def strip_runtime_asserts(module: fx.GraphModule) -> fx.GraphModule:
    """Remove tensor-metadata asserts and guard calls: they pin the traced device and have no users."""
    for node in list(module.graph.nodes):
        name = str(getattr(node.target, "__name__", node.target))
        if (node.op == "call_function" and "_assert_tensor_metadata" in name) or (
            node.op == "call_module" and node.target == "_guards_fn"
        ):
            module.graph.erase_node(node)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _plain_graph_module(module: fx.GraphModule) -> fx.GraphModule:
    """The same graph and weights without the exported program's per-call wrappers.

    ``ExportedProgram.module()`` flattens inputs with pytree, checks shape constraints in a pre-hook and runs guards
    on every call: about 0.1 ms per block on a CPU, which would make a model cut into ten blocks 15-25 % slower than
    the vanilla one. Shapes and dtypes are already validated by Triton against ``config.pbtxt``.
    """
    with warnings.catch_warnings():
        # torch's own copy hook for the graph's pytree specs uses a spelling torch itself deprecates; the warning
        # says nothing about this code and would repeat for every block loaded.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        graph = copy.deepcopy(strip_runtime_asserts(module).graph)
    graph.set_codegen(fx.graph.CodeGen())
    return fx.GraphModule(module, graph)


def load_block(path: Path, device: torch.device) -> fx.GraphModule:
    """Load one exported block onto ``device``; raises ``ArtifactError`` when the file cannot be loaded.

    An exported program records the device it was traced on wherever the model names one (``arange(...,
    device=...)``, ``mask.to(x.device)``: Hugging Face attention-mask code is full of them) and keeps tensors created
    in ``forward`` as constants that ``Module.to`` does not move. ``move_to_device_pass`` retargets both, so blocks
    prepared on a CPU serve on a GPU.
    """
    try:
        with _weights_only_loading():
            module = move_to_device_pass(torch.export.load(str(path)), device).module()
    except Exception as exc:  # torch raises many unrelated types for a bad archive
        raise ArtifactError(f"cannot load exported block {path}: {exc}") from exc
    return _plain_graph_module(module)


def ramp_state_key(ramp_id: int) -> str:
    """Prefix of ramp ``ramp_id``'s tensors in the ramp weights file."""
    return f"ramp{ramp_id}."


@dataclass(frozen=True)
class Verdict:
    """What one exit (a ramp, or the final layer) says about every sample of the batch.

    Args:
        exit: ramp id, or ``Manifest.final_exit`` for the original model's output.
        probs: softmax probabilities ``[batch, classes]``, on the model's device.
        confidence: max probability per sample, on the host.
        prediction: argmax per sample, on the host.
        cost_ms: time spent on this verdict beyond the backbone (the ramp head and its softmax; 0 for the final
            layer, whose softmax a vanilla model computes too).
    """

    exit: int
    probs: torch.Tensor
    confidence: np.ndarray
    prediction: np.ndarray
    cost_ms: float = 0.0


def fuse_blocks(blocks: Sequence[fx.GraphModule], specs: Sequence[BlockSpec], outputs: Sequence[str]) -> fx.GraphModule:
    """One graph module computing ``blocks`` in order, taking the values they consume from outside and returning
    ``outputs``.

    Why: the model is cut at every candidate cut point so any ramp can be switched on without a reload, but between
    two active ramps those cuts only cost time (a Python call and the re-derived symbolic sizes per block, 10-20 us
    each on a CPU, which is 10 % of a small CNN at batch 1). Fusing the blocks between active ramps makes a
    configuration with no active ramp run exactly the vanilla graph.
    """
    root = nn.Module()
    graph = fx.Graph()
    values: dict[str, fx.Node] = {}
    for index, (block, spec) in enumerate(zip(blocks, specs)):
        prefix = f"block{index}"
        root.add_module(prefix, block)
        placeholders = [node for node in block.graph.nodes if node.op == "placeholder"]
        mapping: dict[fx.Node, fx.Node] = {}
        for node, name in zip(placeholders, spec.inputs):
            if name not in values:
                values[name] = graph.placeholder(name.replace(".", "_"))
            mapping[node] = values[name]
        returned = graph.graph_copy(block.graph, mapping)
        for original, copied in mapping.items():
            if original.op in ("get_attr", "call_module"):
                copied.target = f"{prefix}.{original.target}"
        returned = returned if isinstance(returned, (tuple, list)) else (returned,)
        values.update(zip(spec.outputs, returned))
    graph.output(tuple(values[name] for name in outputs))
    graph.eliminate_dead_code()
    return fx.GraphModule(root, graph)


@dataclass(frozen=True)
class Segment:
    """Consecutive blocks run as one fused graph, then (unless it is the last segment) one active ramp.

    Args:
        run: the fused blocks; takes ``inputs``, returns ``outputs`` (``outputs[0]`` is the ramp's feature).
        inputs: names of the values it consumes.
        outputs: names of the values it produces that a later segment, or the ramp, needs.
        ramp: id of the ramp reading ``outputs[0]``, or ``None`` for the final segment.
    """

    run: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ramp: int | None


class EarlyExitModel:
    """A loaded model-repository version folder: blocks, candidate ramps and manifest.

    Args:
        directory: version folder holding ``manifest.json`` and the artifacts.
        device: where weights and activations live; only per-sample confidences and predictions (and the
            probability rows of answered samples) are copied back to the host.
        blocks: load only these blocks (an E3 block model serves a few); all when ``None``.
        ramps: load only these candidate ramps; all when ``None``.
    """

    def __init__(self, directory: Path, device: torch.device | str = "cpu", blocks: range | None = None,
                 ramps: Collection[int] | None = None) -> None:
        self.device = torch.device(device)
        self.manifest: Manifest = load_manifest(Path(directory))
        wanted = range(len(self.manifest.blocks)) if blocks is None else blocks
        self.blocks: list[fx.GraphModule | None] = [
            load_block(Path(directory) / spec.file, self.device) if index in wanted else None
            for index, spec in enumerate(self.manifest.blocks)
        ]
        self.ramps: dict[int, torch.nn.Module] = {}
        self._plans: dict[tuple[int, ...], tuple[Segment, ...]] = {}
        specs = [spec for spec in self.manifest.ramps if ramps is None or spec.id in ramps]
        if specs:
            state = load_file(str(Path(directory) / str(self.manifest.ramp_weights)), device=str(self.device))
            for spec in specs:
                ramp = build_ramp(spec.arch)
                prefix = ramp_state_key(spec.id)
                own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                try:
                    ramp.load_state_dict(own)
                except RuntimeError as exc:
                    raise ArtifactError(f"ramp {spec.id} weights do not match its architecture: {exc}") from exc
                self.ramps[spec.id] = ramp.to(self.device).eval()

    def segment(self, start: int, end: int, ramp: int | None) -> Segment:
        """Blocks ``start..end`` fused into one graph, followed by ``ramp`` (``None``: none, or the final layer)."""
        missing = [index for index in range(start, end + 1) if self.blocks[index] is None]
        if missing:
            raise ArtifactError(f"blocks {missing} are not loaded")
        inputs, outputs = self.manifest.segment_values(start, end)
        loaded = [block for block in self.blocks[start : end + 1] if block is not None]
        run = fuse_blocks(loaded, self.manifest.blocks[start : end + 1], outputs)
        return Segment(run, inputs, outputs, ramp)

    def plan(self, active_ramps: Sequence[int]) -> tuple[Segment, ...]:
        """The segments that serve ``active_ramps`` (fused once per ramp set and cached; call it before the first
        batch of a new configuration so the fusion never runs on the request path)."""
        key = tuple(sorted(active_ramps))
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        ends = [self.manifest.ramps[r].after_block for r in key] + [len(self.manifest.blocks) - 1]
        starts = [0] + [end + 1 for end in ends[:-1]]
        plan = tuple(self.segment(start, end, ramp) for start, end, ramp in zip(starts, ends, [*key, None]))
        self._plans[key] = plan
        return plan

    @staticmethod
    def verdict(exit_index: int, logits: torch.Tensor) -> Verdict:
        """Softmax, confidence and prediction of an exit; only the two ``[batch]`` vectors go to the host."""
        probs = torch.softmax(logits.float(), dim=1)
        confidence, prediction = probs.max(dim=1)
        return Verdict(exit_index, probs, confidence.cpu().numpy(), prediction.cpu().numpy())

    def ramp_verdict(self, ramp_id: int, values: Mapping[str, torch.Tensor], feature: torch.Tensor) -> Verdict:
        """Run ramp ``ramp_id`` on ``feature`` (plus the model inputs its architecture names, e.g. a mask)."""
        started = time.perf_counter()
        extra = [values[name] for name in self.manifest.ramps[ramp_id].arch.get("inputs", ())]
        verdict = self.verdict(ramp_id, self.ramps[ramp_id](feature, *extra))
        return replace(verdict, cost_ms=1000.0 * (time.perf_counter() - started))

    def stages(self, inputs: Mapping[str, torch.Tensor], active_ramps: Sequence[int],
               values: dict[str, torch.Tensor] | None = None) -> Iterator[Verdict]:
        """Run the model; after each segment ending at an active ramp, yield that ramp's verdict; finally yield the
        original model's verdict. Callers act on a verdict (send early answers) before resuming the generator.

        ``values``, when given, receives the activations as they are computed: a caller that stops after a ramp's
        verdict can hand them to ``finish`` to complete the pass later.
        """
        values = {} if values is None else values
        values.update((name, t.to(self.device)) for name, t in inputs.items())
        for segment in self.plan(active_ramps):
            outputs = segment.run(*(values[name] for name in segment.inputs))
            values.update(zip(segment.outputs, outputs))
            if segment.ramp is not None:
                yield self.ramp_verdict(segment.ramp, values, outputs[0])
        yield self.verdict(self.manifest.final_exit, values[self.manifest.blocks[-1].outputs[0]])

    def finish(self, values: dict[str, torch.Tensor], after_ramp: int, active_ramps: Sequence[int]
               ) -> Iterator[Verdict | None]:
        """Complete a pass ``stages`` left after ramp ``after_ramp``'s verdict (its activations in ``values``).

        Runs the remaining blocks one at a time and yields after each: the verdict of an active ramp behind it, else
        ``None``, so a caller can pause between blocks; the original model's verdict comes last. Block by block
        rather than fused, because the pause points are what a caller finishing passes off the request path needs.
        """
        ramp_behind = {self.manifest.ramps[r].after_block: r for r in active_ramps}
        for index in range(self.manifest.ramps[after_ramp].after_block + 1, len(self.manifest.blocks)):
            spec, block = self.manifest.blocks[index], self.blocks[index]
            if block is None:
                raise ArtifactError(f"block {index} is not loaded")
            outputs = block(*(values[name] for name in spec.inputs))
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            values.update(zip(spec.outputs, outputs))
            ramp = ramp_behind.get(index)
            yield None if ramp is None else self.ramp_verdict(ramp, values, outputs[0])
        yield self.verdict(self.manifest.final_exit, values[self.manifest.blocks[-1].outputs[0]])
