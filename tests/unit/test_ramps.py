"""Ramp heads: the masked mean ignores padding; architectures are chosen from the feature and the model's inputs."""

import torch

from early_exit.ramps import build_ramp, ramp_arch_for


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
