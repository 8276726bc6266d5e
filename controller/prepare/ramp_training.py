"""Train every candidate ramp in one pass over the frozen backbone, by distillation from the model's own outputs.

No labels are needed: each ramp learns to reproduce the original model's output distribution (soft targets, KL
divergence) plus its argmax (cross-entropy), which is also what serving-time accuracy is measured against. The soft
targets teach a ramp *how sure* the model is, which is what its confidence must track for thresholds to work; the
hard term keeps the argmax, the quantity agreement is judged on, in front. Backbone features of the (small)
bootstrap training split are computed once and cached; the ramps then train jointly, each with its own loss, so one
schedule serves all candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

FeatureFn = Callable[[dict[str, torch.Tensor]], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class RampData:
    """Cached training data: per cut point its features ``[N, ...]``, the model inputs ``[N, ...]`` (for ramps that
    read one, such as an attention mask) and the original model's logits ``[N, classes]``."""

    features: list[torch.Tensor]
    inputs: dict[str, torch.Tensor]
    logits: torch.Tensor


@torch.no_grad()
def collect_features(features: FeatureFn, batches: Iterable[dict[str, torch.Tensor]]) -> RampData:
    """Concatenate the cut-point features, the model inputs and the final logits over ``batches`` (on the host)."""
    per_cut: list[list[torch.Tensor]] = []
    inputs: dict[str, list[torch.Tensor]] = {}
    finals: list[torch.Tensor] = []
    for batch in batches:
        cuts, logits = features(batch)
        if not per_cut:
            per_cut = [[] for _ in cuts]
        for store, value in zip(per_cut, cuts):
            store.append(value.detach().cpu())
        for name, value in batch.items():
            inputs.setdefault(name, []).append(value.cpu())
        finals.append(logits.float().cpu())
    return RampData([torch.cat(store) for store in per_cut], {k: torch.cat(v) for k, v in inputs.items()},
                    torch.cat(finals))


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || ramp) on the output distributions plus cross-entropy to the teacher's argmax."""
    soft = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                    reduction="batchmean")
    return soft + F.cross_entropy(logits, teacher.argmax(dim=1))


def train_ramps(
    ramps: Sequence[nn.Module],
    ramp_inputs: Sequence[Sequence[str]],
    data: RampData,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> None:
    """Fit ``ramps[i]`` on ``data.features[i]`` (plus the model inputs ``ramp_inputs[i]``) in place."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for ramp in ramps for p in ramp.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    n = len(data.logits)
    steps = epochs * max(1, (n + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for ramp in ramps:
        ramp.train()
    with tqdm(total=steps, desc="train ramps", unit="step") as progress:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                teacher = data.logits[index]
                loss = sum(
                    distillation_loss(ramp(feature[index], *(data.inputs[name][index] for name in names)), teacher)
                    for ramp, feature, names in zip(ramps, data.features, ramp_inputs)
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                optimizer.step()
                schedule.step()
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item() / len(ramps):.3f}")  # type: ignore[union-attr]
    for ramp in ramps:
        ramp.eval()
