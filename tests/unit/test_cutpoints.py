import torch

from controller.prepare.blocks import plan_blocks
from controller.prepare.cutpoints import find_cut_points, split_at
from controller.prepare.pipeline import trace
from model_zoo.cifar_resnet import CifarResNet


def _traced(model: torch.nn.Module, images: torch.Tensor):
    return trace(model, {"IMAGE": images})


def test_resnet_cut_points_fall_on_residual_block_boundaries() -> None:
    model = CifarResNet(blocks_per_stage=2).eval()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    cuts = find_cut_points(_traced(model, images).graph)
    # stem + every residual block except the last (whose output leaves only pooling and the classifier)
    assert len(cuts) == 1 + 3 * 2 - 1
    depths = [cut.depth for cut in cuts]
    assert depths == sorted(depths) and 0 < depths[0] < depths[-1] < 1


def test_blocks_chained_reproduce_the_original_output_exactly() -> None:
    model = CifarResNet(blocks_per_stage=2).eval()
    images = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8)
    graph = _traced(model, images)
    cuts = find_cut_points(graph.graph)
    plans = plan_blocks(split_at(graph, cuts), cuts, ["IMAGE"])
    values = {"IMAGE": images}
    with torch.no_grad():
        for plan in plans:
            values.update(zip(plan.outputs, plan.module(*(values[n] for n in plan.inputs))))
        expected = model(images)
    assert len(plans) == len(cuts) + 1
    assert torch.equal(values[plans[-1].outputs[0]], expected)
