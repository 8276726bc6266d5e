"""Latency model of a ramp-augmented model, from the profile in its manifest.

Latency mode answers a sample when its exit is reached, so a sample that exits at active ramp ``j`` waits for every
block up to that ramp plus every active ramp up to and including ``j``; a sample that never exits waits for all
blocks plus all active ramps. Savings are measured against the vanilla model (all blocks, no ramps).

The profile describes a quiet machine; ``measured_exits`` measures what exits actually save on the serving
machine at its current load, from the timings every feedback record carries, against the fused graph's batch times
measured meanwhile (``controller.baseline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from controller.baseline import FusedBaseline
from controller.window import WindowView
from early_exit.manifest import Manifest


@dataclass(frozen=True)
class LatencyModel:
    """Per-block and per-ramp latency (ms) at one batch size, and where each candidate ramp sits."""

    block_ms: np.ndarray
    ramp_ms: np.ndarray
    ramp_after_block: np.ndarray

    @classmethod
    def from_manifest(cls, manifest: Manifest, batch_size: float) -> LatencyModel:
        if manifest.profile is None:
            raise ValueError(f"manifest of {manifest.name} has no latency profile")
        blocks, ramps = manifest.profile.at(batch_size)
        return cls(blocks, ramps, np.asarray([r.after_block for r in manifest.ramps], dtype=int))

    @property
    def vanilla_ms(self) -> float:
        return float(self.block_ms.sum())

    def exit_latencies(self, active: Sequence[int]) -> np.ndarray:
        """Latency (ms) of answering at each active ramp (in the given depth order) and, last, at the final layer."""
        active = np.asarray(active, dtype=int)
        cumulative_blocks = np.cumsum(self.block_ms)
        ramp_costs = np.cumsum(self.ramp_ms[active]) if len(active) else np.zeros(0)
        at_ramps = cumulative_blocks[self.ramp_after_block[active]] + ramp_costs if len(active) else np.zeros(0)
        final = self.vanilla_ms + (ramp_costs[-1] if len(active) else 0.0)
        return np.append(at_ramps, final)

    def overhead_fraction(self, active: Sequence[int]) -> float:
        """Extra latency of a sample that passes every active ramp, relative to vanilla."""
        return float(self.ramp_ms[np.asarray(active, dtype=int)].sum() / self.vanilla_ms) if len(active) else 0.0


@dataclass(frozen=True)
class MeasuredExits:
    """What a ramp set's exits measured per sample: the time they saved inside their batches (on average, and for
    the median request), the early-exit work they added to them, and the instance's utilisation meanwhile."""

    in_batch_ms: float
    median_in_batch_ms: float
    overhead_ms: float
    busy: float
    count: int
    se_ms: float = 0.0  # standard error of the in-batch saving: the samples' spread and the fused baseline's
    batch_size: float = 1.0  # mean size of the batches the samples were served in (per sample)

    def saving_ms(self, busy: float | None = None) -> float:
        """Saving per sample at utilisation ``busy`` (default: the measured one): the smaller of the mean and the
        median request's, so exits pay only when the request in the middle gains too.

        A sample answered ``answer_ms`` after its batch started would, on the vanilla model, have waited as long as
        the fused graph takes for a batch of that size (``FusedBaseline``, measured live on control batches; without
        enough of them, the batch's own time minus the early-exit work the backend timed, ``batch_ms + tail_ms -
        overhead_ms``, where ``tail_ms`` counts the blocks a batch answered at a ramp ran off the request path).
        Early-exit work also lengthens the time the instance is busy, which delays requests queued behind the batch;
        at utilisation ``rho`` that costs, to first order (M/G/1), ``overhead_ms * rho / (1 - rho)`` per sample.
        Negative when exits do not pay for their ramps at that load, e.g. on a model whose compute is small against
        the serving overhead.

        Why the median too: when fewer than half the requests exit, the median request is one that passes every
        ramp, and it is slower than on the vanilla model although the mean is lower (measured on ResNet-56 with ~40 %
        exiting: +1.4..+3.1 ms mean saving per request while the served median rose 6.9 % and p99 23.8 %).
        """
        return min(self.in_batch_ms, self.median_in_batch_ms) - self.queueing_ms(busy)

    def mean_saving_ms(self, busy: float | None = None) -> float:
        """The mean part of ``saving_ms``: what the exits save on average at utilisation ``busy``."""
        return self.in_batch_ms - self.queueing_ms(busy)

    def may_pay(self, z: float, busy: float | None = None, mean_only: bool = False) -> bool:
        """Whether these measurements leave it open that the exits pay at utilisation ``busy``: their saving
        (``saving_ms``, or only its mean part) is not below zero by more than ``z`` standard errors.

        Why not the point estimate: measured against a few dozen control batches, the saving of the ResNet-56
        reference's exits came out at -0.11 ms on 778 samples where static's exits, in the same benchmark, served
        the median request 3.7 points faster than the ramps switched off; switched off on that estimate, and probed
        once at -1.53 ms on 258 samples, the exits stayed off for the rest of the run. Exits go off, and a probe is
        rolled back, on evidence that they do not pay, as the accuracy guard closes ramps only on a clear breach."""
        saving = self.mean_saving_ms(busy) if mean_only else self.saving_ms(busy)
        return saving + z * self.se_ms > 0

    def queueing_ms(self, busy: float | None = None) -> float:
        """What the early-exit work delays the requests queued behind it, per sample, at utilisation ``busy``."""
        rho = min(self.busy if busy is None else busy, 0.95)
        return self.overhead_ms * rho / (1.0 - rho)


def measured_exits(view: WindowView, since_version: int = 0, baseline: FusedBaseline | None = None) -> MeasuredExits:
    """``MeasuredExits`` of the samples served under configurations ``>= since_version``, against ``baseline``'s
    fused-graph batch times where it has them. The early-exit work is then the whole batch's time beyond the fused
    graph's (its off-path tail included), not only the part the backend timed."""
    chosen = view.version >= since_version
    count = int(chosen.sum())
    if not count:
        return MeasuredExits(0.0, 0.0, 0.0, view.busy, 0)
    timed_overhead = view.overhead_ms[chosen]
    ramped_ms = (view.batch_ms + view.tail_ms)[chosen]  # the whole pass with its ramps, had it run inline
    fused = baseline.ms(view.batch_size[chosen]) if baseline is not None else np.full(count, np.nan)
    known = np.isfinite(fused)
    overhead = np.where(known, ramped_ms - fused, timed_overhead)
    # Each sample's vanilla time is its batch's own minus the mean early-exit work of batches of its size, so the
    # vanilla and served times carry the same noise: the fused graph's mean alone as every sample's vanilla time
    # compared noise-free times with noisy answers, and the median request's saving came out positive (+0.5..+2.4 ms
    # on ResNet-56 with ~40 % exiting, whose median request passes every ramp).
    size = view.batch_size[chosen]
    per_size = np.bincount(size, weights=overhead) / np.maximum(np.bincount(size), 1)
    saved = ramped_ms - per_size[size] - view.answer_ms[chosen]  # its mean is that of each batch's own overhead
    # The mean saving is, per batch size, the fused graph's mean time less the answers' mean time: its variance is
    # the baseline's (each size weighted by its share of the samples) plus the samples' own.
    sizes, counts = np.unique(size[known], return_counts=True)
    baseline_variance = float(np.sum((counts / count) ** 2 * baseline.variance_of_mean(sizes))) if sizes.size else 0.0
    sample_variance = float(saved.var(ddof=1)) / count if count > 1 else 0.0
    return MeasuredExits(float(saved.mean()), float(np.median(saved)), float(overhead.mean()), view.busy, count,
                         float(np.sqrt(baseline_variance + sample_variance)), float(size.mean()))
