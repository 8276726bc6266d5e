"""Accuracy-constrained threshold tuning (paper §3.2), vectorised over candidate moves.

Thresholds are confidence thresholds: a sample exits at the first active ramp whose confidence is at least the
ramp's threshold; 1.0 means "never". Tuning starts from no exits and hill-climbs: each round tries lowering every
ramp's threshold by that ramp's step (or down to the next confidence value seen, so plateaus are crossed), evaluates all those moves at once on the window, keeps the moves that satisfy
the accuracy constraint and improve the estimated latency saving, and applies the one that costs the least accuracy
per unit of saving. A ramp whose move is taken doubles its step; when no move is acceptable every step halves; tuning
ends when all steps fall below ``min_step``. Several initial step sizes are tried and the best result is kept.

Accuracy is agreement with the original model's prediction on the window. With ``z > 0`` the constraint uses the
Wilson lower confidence bound of that agreement instead of the point estimate, which protects small windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from early_exit.exit_config import NEVER_EXIT


@dataclass(frozen=True)
class TunerSettings:
    """Args:
    budget: maximum accuracy loss vs the original model (0.01 = 1 %).
    initial_steps: initial step sizes tried (each run independently).
    min_step: stop when every step is below this.
    z: normal quantile of the accuracy lower bound (0 = point estimate; 1.645 = one-sided 95 %).
    max_rounds: safety bound on hill-climbing rounds per initial step.
    """

    budget: float = 0.01
    initial_steps: tuple[float, ...] = (0.1, 0.05, 0.01)
    min_step: float = 0.001
    z: float = 0.0
    max_rounds: int = 400

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget < 1.0:
            raise ValueError(f"budget must be in [0, 1), got {self.budget}")
        if not self.initial_steps or min(self.initial_steps) <= 0:
            raise ValueError(f"initial_steps must be positive, got {self.initial_steps}")
        if self.min_step <= 0:
            raise ValueError(f"min_step must be positive, got {self.min_step}")


@dataclass(frozen=True)
class Evaluation:
    """Outcome of a threshold vector on a window."""

    accuracy: float
    saving_ms: float
    exit_rates: np.ndarray  # per active ramp, then final


def wilson_lower(successes: np.ndarray, n: int, z: float) -> np.ndarray:
    """Wilson score lower bound of a binomial proportion (elementwise)."""
    p = successes / n
    if z <= 0:
        return p
    denominator = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / denominator


def first_exit(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first exiting ramp per sample for a stack of threshold vectors.

    ``confidence`` is ``[R, N]``; ``thresholds`` is ``[..., R]``; returns ``[..., N]`` with ``R`` for "no exit".
    """
    t = thresholds[..., :, None]
    exits = (confidence >= t) & (t < NEVER_EXIT)
    any_exit = exits.any(axis=-2)
    return np.where(any_exit, exits.argmax(axis=-2), confidence.shape[0])


class ThresholdTuner:
    """Tunes the thresholds of a fixed active ramp set on a window of feedback.

    Args:
        settings: constraint and search parameters.
    """

    def __init__(self, settings: TunerSettings | None = None) -> None:
        self.settings = settings or TunerSettings()

    def evaluate(
        self, thresholds: np.ndarray, confidence: np.ndarray, correct: np.ndarray, exit_ms: np.ndarray
    ) -> Evaluation:
        """Accuracy (point estimate) and mean saving of ``thresholds``.

        Args:
            thresholds: ``[R]``.
            confidence: ``[R, N]`` per active ramp (depth order) and sample.
            correct: ``[R, N]`` whether the ramp's prediction equals the original model's.
            exit_ms: ``[R + 1]`` latency of answering at each ramp and at the final layer.
        """
        first = first_exit(confidence, np.asarray(thresholds, dtype=float))
        n = confidence.shape[1]
        agree = np.append(correct, np.ones((1, n), dtype=bool), axis=0)[first, np.arange(n)]
        saving = exit_ms[-1] - exit_ms[first].mean() if n else 0.0
        rates = np.bincount(first, minlength=len(exit_ms)) / max(n, 1)
        return Evaluation(float(agree.mean()) if n else 1.0, float(saving), rates)

    def tune(
        self,
        confidence: np.ndarray,
        prediction: np.ndarray,
        final: np.ndarray,
        exit_ms: np.ndarray,
    ) -> np.ndarray:
        """Best thresholds ``[R]`` for the window; all ``NEVER_EXIT`` when no exit is affordable.

        Args:
            confidence: ``[R, N]`` confidences of the active ramps (depth order).
            prediction: ``[R, N]`` their predictions.
            final: ``[N]`` the original model's predictions.
            exit_ms: ``[R + 1]`` latency of answering at each active ramp and at the final layer
                (``LatencyModel.exit_latencies``).
        """
        confidence = np.asarray(confidence, dtype=np.float32)
        num_ramps, n = confidence.shape
        if num_ramps == 0 or n == 0:
            return np.full(num_ramps, NEVER_EXIT)
        correct = np.asarray(prediction) == np.asarray(final)[None, :]
        exit_ms = np.asarray(exit_ms, dtype=float)
        best = np.full(num_ramps, NEVER_EXIT)
        best_saving = self.evaluate(best, confidence, correct, exit_ms).saving_ms
        for initial in self.settings.initial_steps:
            thresholds, saving = self._climb(confidence, correct, exit_ms, initial)
            if saving > best_saving + 1e-12:
                best, best_saving = thresholds, saving
        return best

    def _climb(
        self, confidence: np.ndarray, correct: np.ndarray, exit_ms: np.ndarray, initial_step: float
    ) -> tuple[np.ndarray, float]:
        s = self.settings
        num_ramps, n = confidence.shape
        agree_table = np.append(correct, np.ones((1, n), dtype=bool), axis=0)
        samples = np.arange(n)
        thresholds = np.full(num_ramps, NEVER_EXIT)
        steps = np.full(num_ramps, initial_step)
        ordered = np.sort(confidence, axis=1)  # per ramp, ascending: finds the next threshold that changes exits
        first = first_exit(confidence, thresholds)
        hits = agree_table[first, samples].sum()
        saving = exit_ms[-1] - exit_ms[first].mean()
        floor = 1.0 - s.budget
        for _ in range(s.max_rounds):
            if steps.max() < s.min_step:
                break
            candidates = np.repeat(thresholds[None, :], num_ramps, axis=0)
            moves = np.arange(num_ramps)
            # Move by the step, or further when the step would not let a single new sample exit (a plateau).
            below = np.array([np.searchsorted(ordered[r], thresholds[r], side="left") for r in moves])
            next_exit = np.where(below > 0, ordered[moves, np.maximum(below - 1, 0)], 0.0)
            candidates[moves, moves] = np.clip(np.minimum(thresholds - steps, next_exit), 0.0, NEVER_EXIT)
            cand_first = first_exit(confidence, candidates)  # [R, N]
            cand_hits = agree_table[cand_first, samples[None, :]].sum(axis=1)
            cand_saving = exit_ms[-1] - exit_ms[cand_first].mean(axis=1)
            valid = (wilson_lower(cand_hits.astype(float), n, s.z) >= floor) & (cand_saving > saving + 1e-12)
            valid &= candidates[moves, moves] < thresholds
            if not valid.any():
                steps /= 2.0
                continue
            accuracy_drop = (hits - cand_hits).clip(min=0) / n
            ratio = np.where(valid, accuracy_drop / np.maximum(cand_saving - saving, 1e-12), np.inf)
            chosen = int(np.argmin(ratio))
            thresholds = candidates[chosen]
            hits, saving = cand_hits[chosen], cand_saving[chosen]
            steps[chosen] *= 2.0
        return thresholds, float(saving)
