"""Latency-focused ramp adjustment (paper §3.3): drop ramps that do not pay for themselves, try ones near useful ones.

A ramp's utility over the window, in milliseconds per sample, is the latency it saves the samples that exit there
(final-layer latency minus its exit latency) minus the latency it adds to every sample that reaches it without
exiting (its own cost). Ramps with non-positive utility are dropped. One candidate next to the most useful ramp
(halfway towards the deepest ramp, or the neighbour) is tried, as long as the active set stays within the overhead
budget; it enters with threshold 1.0 (observe only) and the tuner opens it once its feedback fills the window.
Utilities here come from the profile; whether a new set really pays is judged on measured latency by the
controller, which rolls a losing set back (``controller.model_controller``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from controller.latency import LatencyModel
from early_exit.exit_rule import first_exit


@dataclass(frozen=True)
class AdjusterSettings:
    """Args:
    overhead_budget: the active ramps may add at most this fraction to the vanilla latency.
    max_ramps: upper bound on active ramps.
    """

    overhead_budget: float = 0.02
    max_ramps: int = 4


def ramp_utilities(
    active: Sequence[int], thresholds: np.ndarray, confidence: np.ndarray, latency: LatencyModel
) -> np.ndarray:
    """Utility (ms per sample) of each active ramp under ``thresholds`` on the window's ``confidence`` ``[R, N]``."""
    n = confidence.shape[1]
    exit_ms = latency.exit_latencies(active)
    first = first_exit(confidence, np.asarray(thresholds, dtype=float))
    utilities = np.zeros(len(active))
    for j, ramp in enumerate(active):
        exiting = first == j
        reaching_without_exit = first > j
        saved = (exit_ms[-1] - exit_ms[j]) * exiting.sum()
        cost = latency.ramp_ms[ramp] * reaching_without_exit.sum()
        utilities[j] = (saved - cost) / max(n, 1)
    return utilities


class RampAdjuster:
    """Proposes a new active ramp set from a tuned window, or ``None`` to keep the current one."""

    def __init__(self, num_candidates: int, settings: AdjusterSettings | None = None) -> None:
        self.num_candidates = num_candidates
        self.settings = settings or AdjusterSettings()
        self._tried: set[int] = set()

    def propose(
        self, active: Sequence[int], thresholds: np.ndarray, confidence: np.ndarray, latency: LatencyModel
    ) -> tuple[int, ...] | None:
        """Call only after ``thresholds`` were tuned on this window for ``active``."""
        active = list(active)
        utilities = ramp_utilities(active, thresholds, confidence, latency) if active else np.zeros(0)
        keep = [r for r, u in zip(active, utilities) if u > 0]
        best = active[int(np.argmax(utilities))] if keep else None
        candidate = self._candidate(keep, best)
        if candidate is not None:
            trial = sorted([*keep, candidate])
            within_budget = latency.overhead_fraction(trial) <= self.settings.overhead_budget
            if len(trial) <= self.settings.max_ramps and (within_budget or not keep):
                keep = trial
        proposal = tuple(sorted(keep))
        return proposal if proposal and proposal != tuple(active) else None

    def _candidate(self, keep: list[int], best: int | None) -> int | None:
        """An untried ramp near the most useful one: halfway to the deepest active ramp, else a neighbour."""
        if best is None:
            options = [self.num_candidates // 2, *range(self.num_candidates - 1, -1, -1)]
        else:
            deepest = max(keep)
            options = [(best + deepest) // 2, best // 2, best - 1, best + 1, (best + self.num_candidates) // 2]
        fresh = [o for o in options if 0 <= o < self.num_candidates and o not in keep and o not in self._tried]
        if not fresh:
            self._tried.clear()  # every neighbour had its trial; loads and inputs change, so start exploring again
            return None
        self._tried.add(fresh[0])
        return fresh[0]
