"""Ramp heads: the masked mean ignores padding; architectures are chosen from the feature and the model's inputs."""

import torch

from early_exit.ramps import MAX_POOLED_FEATURES, build_ramp, ramp_arch_for, ramp_grid


def test_masked_mean_ramp_ignores_padded_positions() -> None:
    arch = ramp_arch_for(torch.zeros(2, 6, 8), classes=3, mask_input="ATTENTION_MASK")
    assert arch["kind"] == "masked_mean_linear" and arch["inputs"] == ["ATTENTION_MASK"]
    ramp = build_ramp(arch).eval()
    feature = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    changed = feature.clone()
    changed[0, 3:] = 100.0  # padding of the first sample
    with torch.no_grad():
        assert torch.allclose(ramp(feature, mask), ramp(changed, mask))


def test_architecture_follows_the_feature_shape() -> None:
    assert ramp_arch_for(torch.zeros(1, 16, 8, 8), 10)["kind"] == "pool_linear"
    assert ramp_arch_for(torch.zeros(1, 6, 8), 2)["kind"] == "token_linear"
    assert ramp_arch_for(torch.zeros(1, 32), 2)["kind"] == "linear"


def test_pooling_grid_is_the_finest_within_the_feature_bound_and_the_map() -> None:
    """4x4 on a CIFAR ResNet's stages, coarser on wide ImageNet stages (their heads and prepare's cache stay
    small), never finer than the feature map."""
    assert [ramp_grid(c, s, s) for c, s in ((16, 32), (32, 16), (64, 8))] == [4, 4, 4]
    assert [ramp_grid(c, s, s) for c, s in ((256, 56), (512, 28), (2048, 7))] == [2, 1, 1]
    assert ramp_grid(16, 3, 5) == 2 and ramp_grid(16, 1, 1) == 1
    arch = ramp_arch_for(torch.zeros(1, 64, 8, 8), 10)
    assert arch["pool"] == 4 and 64 * arch["pool"] ** 2 <= MAX_POOLED_FEATURES
    assert build_ramp(arch)(torch.zeros(3, 64, 8, 8)).shape == (3, 10)


def test_masked_mean_ramp_applies_the_norm_affine_after_pooling_without_changing_the_function() -> None:
    """``reduce`` leaves out the layer norm's affine map so reduced features can be cached; the ramp must still be
    linear(masked mean(layer_norm(tokens))) with the trained affine parameters."""
    torch.manual_seed(0)
    ramp = build_ramp(ramp_arch_for(torch.zeros(1, 5, 8), classes=3, mask_input="ATTENTION_MASK")).eval()
    with torch.no_grad():
        ramp.norm.weight.uniform_(0.5, 2.0)
        ramp.norm.bias.uniform_(-1.0, 1.0)
        feature = torch.randn(4, 5, 8)
        mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
        weights = mask[..., None].float()
        expected = ramp.linear((ramp.norm(feature) * weights).sum(1) / weights.sum(1))
        assert torch.allclose(ramp(feature, mask), expected, atol=1e-5)


def test_every_ramp_is_its_head_applied_to_its_parameter_free_reduction() -> None:
    cases = [
        (torch.randn(3, 16, 8, 8), None, ()),
        (torch.randn(3, 6, 8), None, ()),
        (torch.randn(3, 32), None, ()),
        (torch.randn(3, 6, 8), "ATTENTION_MASK", (torch.ones(3, 6, dtype=torch.int64),)),
    ]
    for feature, mask_input, inputs in cases:
        ramp = build_ramp(ramp_arch_for(feature, 4, mask_input)).eval()
        reduced = ramp.reduce(feature, *inputs)
        assert reduced.dim() == 2 and reduced.shape[0] == 3
        assert not reduced.requires_grad  # no parameter took part, so cached reductions stay valid while heads train
        assert torch.equal(ramp(feature, *inputs), ramp.head(reduced))
