"""Ramp (early-exit head) architectures, built from the JSON description stored in the manifest.

Ramps are deliberately tiny so their cost stays a small fraction of the backbone's (the paper's overhead budget):
- ``pool_linear`` for feature maps ``[B, C, H, W]``: average pooling to a ``pool x pool`` grid, then one linear layer.
  The paper's CV ramps pool globally (``pool = 1``); a grid keeps coarse layout, which early layers need. The grid is
  the finest of 4x4, 2x2 and 1x1 that keeps at most ``MAX_POOLED_FEATURES`` values (``ramp_grid``): 4x4 on a CIFAR
  ResNet's 16-64 channels, 2x2 or global pooling on an ImageNet backbone's hundreds to thousands. Measured on the
  CIFAR ResNet-20 distilled on 20,000 images: 4x4 against 2x2 raised agreement with the final model by 6-13 points
  at the cut points up to 68 % depth; with that grid and data, ResNet-56's modelled saving of the best thresholds
  within the 1 % budget on 5,000 test images rose from 26.8 % (2x2, 2,500 images) to 37.6 %. The finer grid needs
  the samples: on 2,500 it measured no better than 2x2 in the shares of inputs a ramp can answer within the budget.
  A hidden layer between grid and output (256 or 512 units) was tried and not kept: on ResNet-56 it raised agreement
  by 1.6-3 points and the inputs a ramp can answer at 99 % agreement by 6-9 points at 44-74 % depth, but its head
  costs 0.09-0.17 ms at batch 8 on a CPU against 0.01 ms for the linear one, so within the 2 % overhead budget one
  ramp fits instead of three and the assured modelled saving of the initial set fell from 24.8 % to 19.6 %. An 8x8
  grid (ramps at 16-32 channels) measured worse than 4x4 with either head on 20,000 images.
- ``masked_mean_linear`` for token sequences ``[B, T, H]`` of a model that has an attention-mask input: every token
  state layer-normalised, averaged over the real (unmasked) tokens, then one linear layer. It mirrors how a
  mean-pooled encoder (sentence-transformers models such as the MiniLM reference) builds its own sentence vector, so
  early layers are read the way the final head reads the last one (measured on the MiniLM SST-2 reference: see
  the README's ramp table).
- ``token_linear`` for token sequences without a mask: the first token's state (the position a BERT classifier
  reads), layer-normalised, then one linear layer: lighter than DeeBERT's pooler + classifier, with the layer norm
  standing in for the pooler's scale adaptation.

A ramp whose architecture lists ``inputs`` (model input names) receives those tensors after the feature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from early_exit.errors import ArtifactError


class Ramp(nn.Module):
    """A ramp is a parameter-free ``reduce`` (feature map or token states, plus the model inputs its architecture
    names, to one small vector per sample) followed by a trainable ``head``.

    Why split it: ``prepare`` caches what ``reduce`` returns, not the full feature, while it trains every candidate
    at once. A ResNet-56's full feature maps take about 1 MB per sample over its 27 cut points and MiniLM's token
    states about as much, which held ramp training to a few hundred samples; reduced, a sample takes kilobytes, so
    ramps train on thousands.
    """

    def reduce(self, feature: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, reduced: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feature: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.reduce(feature, *inputs))


class PoolLinearRamp(Ramp):
    def __init__(self, channels: int, classes: int, pool: int = 1) -> None:
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(channels * pool * pool, classes)

    def reduce(self, feature: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(feature, self.pool), 1)

    def head(self, reduced: torch.Tensor) -> torch.Tensor:
        return self.linear(reduced)


class _NormedLinear(Ramp):
    """Layer norm, then a linear layer. ``reduce`` normalises without the norm's affine parameters, which ``head``
    applies: an elementwise affine map commutes with the (weighted) mean over tokens, so this is the same function as
    ``linear(mean(norm(tokens)))`` and keeps the ``norm.weight`` / ``norm.bias`` parameter names."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, classes)

    def _normalised(self, states: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(states, self.norm.normalized_shape, eps=self.norm.eps)

    def head(self, reduced: torch.Tensor) -> torch.Tensor:
        return self.linear(reduced * self.norm.weight + self.norm.bias)


class TokenLinearRamp(_NormedLinear):
    def reduce(self, feature: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self._normalised(feature[:, 0])


class MaskedMeanLinearRamp(_NormedLinear):
    def reduce(self, feature: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        (mask,) = inputs
        weights = mask[:, : feature.shape[1], None].to(feature.dtype)
        return (self._normalised(feature) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class LinearRamp(Ramp):
    """For a feature that already is one vector per sample."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def reduce(self, feature: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return feature

    def head(self, reduced: torch.Tensor) -> torch.Tensor:
        return self.linear(reduced)


#: Most values a ``pool_linear`` ramp reduces a feature map to: bounds its head's size and ``prepare``'s per-sample
#: cache on a backbone of any width.
MAX_POOLED_FEATURES = 1024


def ramp_grid(channels: int, height: int, width: int) -> int:
    """Side of the pooling grid of a ``pool_linear`` ramp: the finest of 4, 2 and 1 within ``MAX_POOLED_FEATURES``
    values and no finer than the feature map itself."""
    for pool in (4, 2):
        if pool <= min(height, width) and channels * pool * pool <= MAX_POOLED_FEATURES:
            return pool
    return 1


def ramp_arch_for(feature: torch.Tensor, classes: int, mask_input: str | None = None) -> dict[str, Any]:
    """Pick a ramp architecture from the shape of the feature it reads (batch dimension first).

    Args:
        feature: an example of the feature at the cut point.
        classes: outputs of the classifier.
        mask_input: name of the model's attention-mask input, if it has one (token models).
    """
    if feature.dim() == 4:
        channels, height, width = (int(size) for size in feature.shape[1:])
        return {"kind": "pool_linear", "channels": channels, "classes": classes,
                "pool": ramp_grid(channels, height, width)}
    if feature.dim() == 3 and mask_input is not None:
        return {"kind": "masked_mean_linear", "hidden": int(feature.shape[2]), "classes": classes,
                "inputs": [mask_input]}
    if feature.dim() == 3:
        return {"kind": "token_linear", "hidden": int(feature.shape[2]), "classes": classes}
    if feature.dim() == 2:
        return {"kind": "linear", "features": int(feature.shape[1]), "classes": classes}
    raise ArtifactError(f"no ramp architecture for a feature of shape {tuple(feature.shape)}")


def build_ramp(arch: dict[str, Any]) -> Ramp:
    """Instantiate an untrained ramp; raises ``ArtifactError`` for an unknown description."""
    kind = arch.get("kind")
    try:
        if kind == "pool_linear":
            return PoolLinearRamp(int(arch["channels"]), int(arch["classes"]), int(arch.get("pool", 1)))
        if kind == "masked_mean_linear":
            return MaskedMeanLinearRamp(int(arch["hidden"]), int(arch["classes"]))
        if kind == "token_linear":
            return TokenLinearRamp(int(arch["hidden"]), int(arch["classes"]))
        if kind == "linear":
            return LinearRamp(int(arch["features"]), int(arch["classes"]))
    except KeyError as exc:
        raise ArtifactError(f"ramp architecture {arch} lacks field {exc}") from exc
    raise ArtifactError(f"unknown ramp kind {kind!r}")
