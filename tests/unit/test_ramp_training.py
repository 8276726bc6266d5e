"""Ramp training: reduced features are cached per cut point, and heads learn the teacher's answers from them."""

from __future__ import annotations

import torch

from controller.prepare.ramp_training import collect_reduced, train_ramps
from early_exit.ramps import build_ramp, ramp_arch_for

CLASSES = 3


def _teacher_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"X": torch.randn(50, 4, 8, 8, generator=generator)} for _ in range(count)]


def _features(batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two cut points (the input and its square) and a teacher whose logits are a linear map of the per-channel
    means: a pooled linear ramp on the first cut point can learn it, one on the second only partly."""
    x = batch["X"]
    teacher = torch.nn.functional.linear(x.mean(dim=(2, 3)), torch.arange(12.0).reshape(CLASSES, 4) - 5.5)
    return [x, x * x], teacher


def test_reduced_features_are_cached_small_and_heads_learn_the_teacher() -> None:
    torch.manual_seed(0)
    example, _ = _features(_teacher_batches(1, 0)[0])
    ramps = [build_ramp(ramp_arch_for(f, CLASSES)) for f in example]
    data = collect_reduced(_features, ramps, [[], []], _teacher_batches(20, 1))
    assert [tuple(r.shape) for r in data.reduced] == [(1000, 64), (1000, 64)]  # 4 channels x 4x4 grid, not 4x8x8
    assert data.logits.shape == (1000, CLASSES)

    def agreement(ramp: torch.nn.Module, cut: int) -> float:
        batch = _teacher_batches(1, 2)[0]
        features, teacher = _features(batch)
        with torch.no_grad():
            return float((ramp(features[cut]).argmax(1) == teacher.argmax(1)).float().mean())

    before = agreement(ramps[0], 0)
    train_ramps(ramps, data, epochs=30)
    assert agreement(ramps[0], 0) > 0.9 > before
    assert agreement(ramps[0], 0) > agreement(ramps[1], 1)
