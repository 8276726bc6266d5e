"""ONNX ingestion: an ONNX export of the CIFAR ResNet is cut at the same block boundaries and reproduced exactly."""

from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from controller.prepare.blocks import plan_blocks
from controller.prepare.cutpoints import find_cut_points, split_at
from controller.prepare.onnx_import import load_onnx
from controller.prepare.pipeline import trace
from early_exit.errors import ArtifactError
from model_zoo.cifar_resnet import CifarResNet


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    model = CifarResNet().eval()
    model.load_state_dict(load_file(str(checkpoint)))
    path = tmp_path_factory.mktemp("onnx") / "cifar_resnet.onnx"
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    torch.onnx.export(model, (images,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def test_onnx_graph_runs_like_the_original(onnx_file: Path, checkpoint: Path) -> None:
    original = CifarResNet().eval()
    original.load_state_dict(load_file(str(checkpoint)))
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(load_onnx(onnx_file)(images), original(images), rtol=1e-4, atol=1e-4)


def test_onnx_model_is_cut_at_block_boundaries_and_reproduced_exactly(onnx_file: Path) -> None:
    model = load_onnx(onnx_file)
    images = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8)
    graph = trace(model, {"IMAGE": images})
    cuts = find_cut_points(graph.graph)
    assert len(cuts) == 1 + 3 * 3 - 1  # stem + residual blocks, as for the PyTorch model
    plans = plan_blocks(split_at(graph, cuts), cuts, ["IMAGE"])
    values = {"IMAGE": images}
    with torch.no_grad():
        for plan in plans:
            values.update(zip(plan.outputs, plan.module(*(values[n] for n in plan.inputs))))
        assert torch.equal(values[plans[-1].outputs[0]], model(images))


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    node = onnx.helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])])
    path = tmp_path / "einsum.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(ArtifactError, match="Einsum"):
        load_onnx(path)
