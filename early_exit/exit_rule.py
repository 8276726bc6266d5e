"""The exit rule, written once: the backend, the controller's tuner and window, ``prepare`` and the benchmark all
decide "does this sample exit here" through these functions, so what the controller models is what the server does.

A sample exits at the first active ramp whose confidence (max softmax probability) is at least that ramp's threshold.
A threshold of ``NEVER_EXIT`` (1.0) or more never exits, even for a confidence that rounds to exactly 1.0 in float32:
such a ramp still reports feedback.
"""

from __future__ import annotations

import numpy as np

NEVER_EXIT = 1.0
#: The tightest threshold that still exits: float32's largest value below ``NEVER_EXIT``. Thresholds raised to the
#: confidence that clears them (the tuner's and the controller's snapping) stop here, so that the samples whose
#: confidence is exactly 1.0 still exit at the threshold chosen for them.
TIGHTEST_OPEN = float(np.nextafter(np.float32(NEVER_EXIT), np.float32(0.0)))


def exits_at(confidence: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Whether each sample's ``confidence`` clears ``threshold`` (broadcasting)."""
    threshold = np.asarray(threshold)
    return (confidence >= threshold) & (threshold < NEVER_EXIT)


def first_exit(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first exiting ramp per sample; ``R`` (the final layer) when none exits.

    Args:
        confidence: ``[R, N]`` per active ramp (depth order) and sample.
        thresholds: ``[..., R]``; leading dimensions evaluate several threshold vectors at once.

    Returns:
        ``[..., N]`` integer exit positions.
    """
    exits = exits_at(confidence, np.asarray(thresholds, dtype=float)[..., :, None])
    if exits.shape[-2] == 0:  # no active ramp: every sample runs to the final layer
        return np.zeros(exits.shape[:-2] + exits.shape[-1:], dtype=np.intp)
    return np.where(exits.any(axis=-2), exits.argmax(axis=-2), confidence.shape[0])


def any_exit(confidence: np.ndarray, thresholds: np.ndarray) -> bool:
    """Whether any sample of ``confidence`` ``[R, N]`` exits at a ramp under ``thresholds`` ``[R]``."""
    return bool((first_exit(confidence, thresholds) < confidence.shape[0]).any())


def served_predictions(prediction: np.ndarray, final: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The answer each sample gets: its exit ramp's prediction, or the original model's when it exits nowhere.

    Args:
        prediction: ``[R, N]`` per active ramp and sample.
        final: ``[N]`` the original model's prediction.
        first: ``[N]`` exit positions from :func:`first_exit`.
    """
    table = np.concatenate([np.asarray(prediction).reshape(-1, final.shape[0]), final[None, :]])
    return table[first, np.arange(final.shape[0])]
