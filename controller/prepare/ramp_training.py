"""Train every candidate ramp in one pass over the frozen backbone, by distillation from the model's own outputs.

No labels are needed: each ramp learns to reproduce the original model's output distribution (soft targets, KL
divergence) plus its argmax (cross-entropy), which is also what serving-time accuracy is measured against. The soft
targets teach a ramp *how sure* the model is, which is what its confidence must track for thresholds to work; the
hard term keeps the argmax, the quantity agreement is judged on, in front. The backbone runs once over the bootstrap
training split, and each cut point's feature is cached already reduced by its ramp's parameter-free ``reduce``
(kilobytes per sample instead of the full feature map), so ramps train on thousands of samples; the heads then train
jointly, each with its own loss, so one schedule serves all candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from early_exit.ramps import Ramp

FeatureFn = Callable[[dict[str, torch.Tensor]], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class RampData:
    """Cached training data: per cut point its ramp's reduced features ``[N, D]`` and the original model's logits
    ``[N, classes]``."""

    reduced: list[torch.Tensor]
    logits: torch.Tensor


@torch.no_grad()
def collect_reduced(features: FeatureFn, ramps: Sequence[Ramp], ramp_inputs: Sequence[Sequence[str]],
                    batches: Iterable[dict[str, torch.Tensor]]) -> RampData:
    """Run the backbone over ``batches`` and keep, per cut point, ``ramps[i].reduce`` of its feature (with the model
    inputs ``ramp_inputs[i]``) and the final logits, on the host."""
    per_cut: list[list[torch.Tensor]] = [[] for _ in ramps]
    finals: list[torch.Tensor] = []
    for batch in tqdm(batches, desc="ramp features", unit="batch"):
        cuts, logits = features(batch)
        for store, ramp, names, feature in zip(per_cut, ramps, ramp_inputs, cuts):
            store.append(ramp.reduce(feature, *(batch[name] for name in names)).float().cpu())
        finals.append(logits.float().cpu())
    return RampData([torch.cat(store) for store in per_cut], torch.cat(finals))


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || ramp) on the output distributions plus cross-entropy to the teacher's argmax."""
    soft = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                    reduction="batchmean")
    return soft + F.cross_entropy(logits, teacher.argmax(dim=1))


def train_ramps(
    ramps: Sequence[Ramp],
    data: RampData,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> None:
    """Fit ``ramps[i].head`` on ``data.reduced[i]`` in place."""
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
                    distillation_loss(ramp.head(reduced[index]), teacher) for ramp, reduced in zip(ramps, data.reduced)
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                optimizer.step()
                schedule.step()
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item() / len(ramps):.3f}")  # type: ignore[union-attr]
    for ramp in ramps:
        ramp.eval()
