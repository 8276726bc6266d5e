"""Measure per-block and per-ramp latency of the *exported* artifacts at each batch size, on the serving device."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from early_exit.manifest import Profile
from early_exit.runtime import EarlyExitModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def profile_model(
    model: EarlyExitModel,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    batch_sizes: Sequence[int],
    repeats: int = 15,
    warmup: int = 3,
) -> Profile:
    """Median latency (ms) of every block and every ramp at every batch size.

    Args:
        model: loaded artifacts (the code path that serves).
        make_inputs: representative model inputs for a batch size.
        batch_sizes: batch sizes to profile, ascending.
    """
    manifest = model.manifest
    block_ms = np.zeros((len(manifest.blocks), len(batch_sizes)))
    ramp_ms = np.zeros((len(manifest.ramps), len(batch_sizes)))
    for column, batch_size in enumerate(tqdm(batch_sizes, desc="profile", unit="batch size")):
        values = {k: v.to(model.device) for k, v in make_inputs(batch_size).items()}
        block_samples: list[list[float]] = [[] for _ in manifest.blocks]
        ramp_samples: list[list[float]] = [[] for _ in manifest.ramps]
        for repeat in range(warmup + repeats):
            env = dict(values)
            for index, (spec, block) in enumerate(zip(manifest.blocks, model.blocks)):
                _sync(model.device)
                started = time.perf_counter()
                outputs = block(*(env[name] for name in spec.inputs))
                _sync(model.device)
                if repeat >= warmup:
                    block_samples[index].append(time.perf_counter() - started)
                outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
                env.update(zip(spec.outputs, outputs))
                for ramp in manifest.ramps:
                    if ramp.after_block != index:
                        continue
                    verdict = model.ramp_verdict(ramp.id, env, outputs[0])
                    if repeat >= warmup:
                        ramp_samples[ramp.id].append(verdict.cost_ms / 1000.0)
        block_ms[:, column] = [1000 * float(np.median(s)) for s in block_samples]
        if manifest.ramps:
            ramp_ms[:, column] = [1000 * float(np.median(s)) for s in ramp_samples]
    return Profile(
        device=str(model.device),
        batch_sizes=tuple(int(b) for b in batch_sizes),
        block_ms=tuple(tuple(round(v, 4) for v in row) for row in block_ms),
        ramp_ms=tuple(tuple(round(v, 4) for v in row) for row in ramp_ms),
    )
