"""Train every candidate ramp in one pass setup over the frozen backbone, against the model's own predictions.

No labels are needed: the target of every ramp is the original model's argmax, which is also what serving-time
accuracy is measured against. Backbone features of the (small) bootstrap training split are computed once and cached;
the ramps then train jointly, each with its own loss, so one schedule serves all candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

FeatureFn = Callable[[dict[str, torch.Tensor]], tuple[list[torch.Tensor], torch.Tensor]]


@torch.no_grad()
def collect_features(
    features: FeatureFn, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Concatenate the cut-point features and the final predictions over ``batches`` (on the host)."""
    per_cut: list[list[torch.Tensor]] = []
    finals: list[torch.Tensor] = []
    for batch in batches:
        cuts, logits = features(batch)
        if not per_cut:
            per_cut = [[] for _ in cuts]
        for store, value in zip(per_cut, cuts):
            store.append(value.detach().cpu())
        finals.append(logits.argmax(dim=1).cpu())
    return [torch.cat(store) for store in per_cut], torch.cat(finals)


def train_ramps(
    ramps: Sequence[nn.Module],
    features: Sequence[torch.Tensor],
    targets: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> None:
    """Fit ``ramps[i]`` on ``features[i]`` to ``targets`` (in place), with a progress bar."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for ramp in ramps for p in ramp.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    n = len(targets)
    steps = epochs * max(1, (n + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for ramp in ramps:
        ramp.train()
    with tqdm(total=steps, desc="train ramps", unit="step") as progress:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                loss = sum(F.cross_entropy(ramp(feature[index]), targets[index]) for ramp, feature in zip(ramps, features))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                optimizer.step()
                schedule.step()
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item() / len(ramps):.3f}")  # type: ignore[union-attr]
    for ramp in ramps:
        ramp.eval()
