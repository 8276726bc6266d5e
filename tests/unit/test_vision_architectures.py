"""ResNet-50, VGG-16 and a ViT are cut at every block boundary, and their exported blocks chained reproduce the model,
both from the PyTorch module and through an ONNX export (small inputs keep the file fast: the cut points depend on
the architecture, not on the resolution). VGG-16 runs with batch norm: the variant with the most operators between
two convolutions, and the same ONNX graph as without it once the exporter folds the norms into the convolutions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from controller.prepare.blocks import BlockPlan, export_block, plan_blocks
from controller.prepare.cutpoints import CutPoint, find_cut_points, split_at
from controller.prepare.onnx_import import load_onnx
from controller.prepare.pipeline import trace
from early_exit.runtime import load_block
from model_zoo.vision import VGG, Bottleneck, EncoderLayer, ResNet, VisionTransformer

TRACED_BATCH = 2
SERVED_BATCH = 3  # another batch size than the traced one: blocks keep a dynamic batch dimension


def _resnet_boundaries(model: nn.Module) -> list[str]:
    """The stem (ending at its max pool), then every bottleneck block; the last block leaves only the head."""
    blocks = [name for name, module in model.named_modules() if isinstance(module, Bottleneck)]
    return ["maxpool", *blocks[:-1]]


def _vgg_boundaries(model: nn.Module) -> list[str]:
    """Every conv(+bn)+relu unit, ending at the max pool when one follows; the last unit leaves only the head."""
    features = list(model.features)
    ends = [
        index + 1 if index + 1 < len(features) and isinstance(features[index + 1], nn.MaxPool2d) else index
        for index, layer in enumerate(features)
        if isinstance(layer, nn.ReLU)
    ]
    return [f"features.{end}" for end in ends[:-1]]


def _vit_boundaries(model: nn.Module) -> list[str]:
    """The embedded tokens, then both residual adds (attention, MLP) of every encoder layer but the last one's MLP."""
    layers = [name for name, module in model.named_modules() if isinstance(module, EncoderLayer)]
    return ["encoder.dropout", *[name for name in layers for _ in range(2)][:-1]]


@dataclass(frozen=True)
class Architecture:
    """A model under test: how to build it, its input side and the module each cut point must end."""

    build: Callable[[], nn.Module]
    image_size: int
    boundaries: Callable[[nn.Module], list[str]]


ARCHITECTURES = {
    "resnet50": Architecture(lambda: ResNet((3, 4, 6, 3), num_classes=10), 64, _resnet_boundaries),
    "vgg16_bn": Architecture(lambda: VGG(10, batch_norm=True, pool_size=1, classifier_width=256), 32, _vgg_boundaries),
    "vit": Architecture(
        lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                                  num_classes=10),
        32, _vit_boundaries,
    ),
}


@dataclass(frozen=True)
class Traced:
    """A model with random weights, its traced graph and cut points."""

    architecture: Architecture
    model: nn.Module
    graph: fx.GraphModule
    cuts: list[CutPoint]

    def images(self, batch: int) -> torch.Tensor:
        return _images(self.architecture, batch)


def _images(architecture: Architecture, batch: int) -> torch.Tensor:
    size = architecture.image_size
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def traced(request: pytest.FixtureRequest) -> Traced:
    torch.manual_seed(0)
    architecture = ARCHITECTURES[request.param]
    model = architecture.build().eval()
    graph = trace(model, {"IMAGE": _images(architecture, TRACED_BATCH)})
    return Traced(architecture, model, graph, find_cut_points(graph.graph))


def _innermost_module(graph: fx.GraphModule, node_name: str) -> str:
    node = next(node for node in graph.graph.nodes if node.name == node_name)
    return list(node.meta["nn_module_stack"].values())[-1][0]


def _run_chain(plans: list[BlockPlan], blocks: list[Callable[..., tuple[torch.Tensor, ...]]],
               images: torch.Tensor) -> torch.Tensor:
    values = {"IMAGE": images}
    with torch.no_grad():
        for plan, block in zip(plans, blocks):
            values.update(zip(plan.outputs, block(*(values[name] for name in plan.inputs))))
    return values[plans[-1].outputs[0]]


def test_cut_points_fall_on_every_block_boundary(traced: Traced) -> None:
    found = [_innermost_module(traced.graph, cut.node) for cut in traced.cuts]
    assert found == traced.architecture.boundaries(traced.model)
    depths = [cut.depth for cut in traced.cuts]
    assert depths == sorted(depths) and 0 < depths[0] and depths[-1] < 1


def test_exported_blocks_chained_reproduce_the_model_exactly(traced: Traced, tmp_path: Path) -> None:
    plans = plan_blocks(split_at(traced.graph, traced.cuts), traced.cuts, ["IMAGE"])
    example = traced.images(TRACED_BATCH)
    values = {"IMAGE": example}
    blocks = []
    for index, plan in enumerate(plans):
        args = [values[name] for name in plan.inputs]
        with torch.no_grad():
            values.update(zip(plan.outputs, plan.module(*args)))
        export_block(plan, args, tmp_path / f"block_{index}.pt2")
        blocks.append(load_block(tmp_path / f"block_{index}.pt2", torch.device("cpu")))
    images = traced.images(SERVED_BATCH)
    with torch.no_grad():
        expected = traced.model(images)
    assert len(blocks) == len(traced.cuts) + 1
    assert torch.equal(_run_chain(plans, blocks, images), expected)


def test_onnx_export_is_cut_at_the_same_depths_and_reproduced_exactly(traced: Traced, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    torch.onnx.export(traced.model, (traced.images(TRACED_BATCH),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    imported = load_onnx(path)
    graph = trace(imported, {"IMAGE": traced.images(TRACED_BATCH)})
    cuts = find_cut_points(graph.graph)
    assert [cut.depth for cut in cuts] == pytest.approx([cut.depth for cut in traced.cuts], rel=1e-6)
    plans = plan_blocks(split_at(graph, cuts), cuts, ["IMAGE"])
    images = traced.images(SERVED_BATCH)
    with torch.no_grad():
        served = imported(images)
        torch.testing.assert_close(served, traced.model(images), rtol=1e-4, atol=1e-5)
    assert torch.equal(_run_chain(plans, [plan.module for plan in plans], images), served)
