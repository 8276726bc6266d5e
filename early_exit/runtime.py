"""Run a ramp-augmented model block by block, yielding each active ramp's verdict as soon as it is known.

The same runtime serves requests in the Triton backend and measures latency during preparation, so profiled numbers
describe exactly the code that serves.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import fx

from early_exit.errors import ArtifactError
from early_exit.manifest import Manifest, load_manifest
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
    graph = copy.deepcopy(strip_runtime_asserts(module).graph)
    graph.set_codegen(fx.graph.CodeGen())
    return fx.GraphModule(module, graph)


def load_block(path: Path, device: torch.device) -> fx.GraphModule:
    """Load one exported block onto ``device``; raises ``ArtifactError`` when the file cannot be loaded."""
    try:
        with _weights_only_loading():
            module = torch.export.load(str(path)).module()
    except Exception as exc:  # torch raises many unrelated types for a bad archive
        raise ArtifactError(f"cannot load exported block {path}: {exc}") from exc
    return _plain_graph_module(module).to(device)


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
    """

    exit: int
    probs: torch.Tensor
    confidence: np.ndarray
    prediction: np.ndarray


class EarlyExitModel:
    """A loaded model-repository version folder: blocks, candidate ramps and manifest.

    Args:
        directory: version folder holding ``manifest.json`` and the artifacts.
        device: where weights and activations live; only per-sample confidences and predictions (and the
            probability rows of answered samples) are copied back to the host.
    """

    def __init__(self, directory: Path, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.manifest: Manifest = load_manifest(Path(directory))
        self.blocks = [load_block(Path(directory) / spec.file, self.device) for spec in self.manifest.blocks]
        self.ramps: dict[int, torch.nn.Module] = {}
        if self.manifest.ramps:
            state = load_file(str(Path(directory) / str(self.manifest.ramp_weights)), device=str(self.device))
            for spec in self.manifest.ramps:
                ramp = build_ramp(spec.arch)
                prefix = ramp_state_key(spec.id)
                own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                try:
                    ramp.load_state_dict(own)
                except RuntimeError as exc:
                    raise ArtifactError(f"ramp {spec.id} weights do not match its architecture: {exc}") from exc
                self.ramps[spec.id] = ramp.to(self.device).eval()

    @staticmethod
    def verdict(exit_index: int, logits: torch.Tensor) -> Verdict:
        """Softmax, confidence and prediction of an exit; only the two ``[batch]`` vectors go to the host."""
        probs = torch.softmax(logits.float(), dim=1)
        confidence, prediction = probs.max(dim=1)
        return Verdict(exit_index, probs, confidence.cpu().numpy(), prediction.cpu().numpy())

    def stages(self, inputs: Mapping[str, torch.Tensor], active_ramps: Sequence[int]) -> Iterator[Verdict]:
        """Run every block; after each block that carries an active ramp, yield that ramp's verdict; finally yield
        the original model's verdict. Callers act on a verdict (send early answers) before resuming the generator.
        """
        ramp_after = {self.manifest.ramps[r].after_block: r for r in active_ramps}
        values: dict[str, torch.Tensor] = {name: t.to(self.device) for name, t in inputs.items()}
        for index, (spec, block) in enumerate(zip(self.manifest.blocks, self.blocks)):
            outputs = block(*(values[name] for name in spec.inputs))
            if isinstance(outputs, torch.Tensor):
                outputs = (outputs,)
            values.update(zip(spec.outputs, outputs))
            ramp_id = ramp_after.get(index)
            if ramp_id is not None:
                yield self.verdict(ramp_id, self.ramps[ramp_id](outputs[0]))
        yield self.verdict(self.manifest.final_exit, values[self.manifest.blocks[-1].outputs[0]])
