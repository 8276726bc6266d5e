"""GPU-ready artifacts: exported blocks run on a device other than the one they were prepared on.

The serving loader puts every block on the ``meta`` device (tensors with shapes and dtypes but no data) and the chain
runs on meta inputs. A block still bound to the preparing machine's CPU (a ``device="cpu"`` factory call, a ``.to``
with the traced device, a constant left behind by ``Module.to``) then computes on two devices and fails, or returns a
tensor off meta. Meta needs no GPU, so the check runs wherever the tests run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from controller.prepare.blocks import export_block, plan_blocks
from controller.prepare.cutpoints import find_cut_points, split_at
from controller.prepare.pipeline import trace
from controller.prepare.sources import load_model
from early_exit.manifest import BlockSpec, RampSpec, TensorSpec, load_manifest, sha256_of
from early_exit.ramps import build_ramp, ramp_arch_for
from early_exit.runtime import load_block
from tests.conftest import MODEL

META = torch.device("meta")
BATCH = 3

BlockLoader = Callable[[Path, torch.device], Callable[..., tuple[torch.Tensor, ...]]]


def run_on_meta(directory: Path, blocks: Sequence[BlockSpec], inputs: Mapping[str, torch.Tensor],
                loader: BlockLoader = load_block) -> dict[str, torch.Tensor]:
    """Load ``blocks`` onto meta with ``loader`` and chain them on meta copies of ``inputs``; every value produced.

    Raises:
        RuntimeError: when a block computes on, or returns a tensor of, another device.
    """
    values = {name: tensor.to(META) for name, tensor in inputs.items()}
    for spec in blocks:
        outputs = loader(directory / spec.file, META)(*(values[name] for name in spec.inputs))
        for name, output in zip(spec.outputs, outputs):
            if output.device != META:
                raise RuntimeError(f"{spec.file} returns {name} on {output.device}")
        values.update(zip(spec.outputs, outputs))
    return values


def assert_ramps_run_on_meta(ramps: Sequence[RampSpec], blocks: Sequence[BlockSpec], values: Mapping[str, torch.Tensor],
                             classes: int) -> None:
    """Every ramp, built on meta, reads its cut point's meta feature (and the inputs it names) and gives logits."""
    for spec in ramps:
        ramp = build_ramp(spec.arch).to(META)
        extra = [values[name] for name in spec.arch.get("inputs", ())]
        logits = ramp(values[blocks[spec.after_block].outputs[0]], *extra)
        assert logits.device == META and logits.shape == (BATCH, classes), f"ramp {spec.id}"


def meta_inputs(specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    return {spec.name: torch.empty((BATCH, *spec.shape), dtype=getattr(torch, spec.dtype), device=META)
            for spec in specs}


def export_blocks(model: nn.Module, example: dict[str, torch.Tensor], primary: str, directory: Path) -> list[BlockSpec]:
    """Trace ``model``, cut it and export its blocks into ``directory`` as ``prepare`` does; their specs."""
    graph = trace(model, example)
    cuts = find_cut_points(graph.graph, list(example).index(primary))
    values = dict(example)
    specs = []
    for index, plan in enumerate(plan_blocks(split_at(graph, cuts), cuts, list(example))):
        args = [values[name] for name in plan.inputs]
        with torch.no_grad():
            values.update(zip(plan.outputs, plan.module(*args)))
        path = directory / f"block_{index}.pt2"
        export_block(plan, args, path)
        specs.append(BlockSpec(path.name, tuple(plan.inputs), tuple(plan.outputs), sha256_of(path)))
    return specs


@pytest.mark.parametrize("entry", [MODEL, f"{MODEL}_vanilla"])
def test_prepared_entry_runs_on_another_device(repository: Path, entry: str) -> None:
    manifest = load_manifest(repository / entry / "1")
    values = run_on_meta(repository / entry / "1", manifest.blocks, meta_inputs(manifest.inputs))
    assert values[manifest.blocks[-1].outputs[0]].shape == (BATCH, manifest.classes)
    assert_ramps_run_on_meta(manifest.ramps, manifest.blocks, values, manifest.classes)


def test_hugging_face_encoder_with_attention_mask_runs_on_another_device(tmp_path: Path) -> None:
    """Attention-mask code is where Hugging Face models name the device (``arange(..., device=mask.device)``)."""
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    model = load_model(str(folder)).module
    ids = torch.randint(2, 64, (BATCH, 16))
    mask = (torch.arange(16) < torch.tensor([[16], [9], [4]])).long()
    blocks = export_blocks(model, {"INPUT_IDS": ids, "ATTENTION_MASK": mask}, "INPUT_IDS", tmp_path)
    values = run_on_meta(tmp_path, blocks, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    assert len(blocks) == 2 * config.num_hidden_layers  # a cut after each sub-layer but the last
    assert values[blocks[-1].outputs[0]].shape == (BATCH, config.num_labels)
    ramps = [RampSpec(index, index, ramp_arch_for(values[spec.outputs[0]], config.num_labels, "ATTENTION_MASK"))
             for index, spec in enumerate(blocks[:-1])]
    assert_ramps_run_on_meta(ramps, blocks, values, config.num_labels)


class PositionOffsets(nn.Module):
    """Adds each token's position, created the way model code often does it: on a hard-coded device."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.arange(hidden.shape[1], device="cpu")[:, None]


def _load_as_traced(path: Path, device: torch.device) -> nn.Module:
    """What loading without retargeting gives: ``torch.export.load``, then ``Module.to``."""
    return torch.export.load(str(path)).module().to(device)


def test_a_block_bound_to_the_cpu_is_caught_and_the_loader_retargets_it(tmp_path: Path) -> None:
    hidden = torch.randn(BATCH, 5, 4)
    blocks = export_blocks(PositionOffsets(), {"HIDDEN": hidden}, "HIDDEN", tmp_path)
    with pytest.raises(RuntimeError, match="cpu"):
        run_on_meta(tmp_path, blocks, {"HIDDEN": hidden}, loader=_load_as_traced)
    values = run_on_meta(tmp_path, blocks, {"HIDDEN": hidden})
    assert values[blocks[-1].outputs[0]].shape == hidden.shape
