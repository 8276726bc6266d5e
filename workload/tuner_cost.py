"""Threshold tuning cost: milliseconds of one tuning of R ramps on a window of N samples, the controller's work per
round (it tunes on half its window, then judges on the other half).

Each window is synthetic (:func:`workload.controller_load.synthetic_verdicts`: deeper ramps more confident and more
often right), with exit costs growing linearly with depth, so any ramp count can be measured, not only a prepared
entry's; ``make bench`` reports the same figure on the measured feedback of each reference model. Reported per window:
the median of ``--repeats`` tunings from scratch (the controller's first round, or one after a drift) and from the
thresholds that tuning found (every later round: both climbs run, the one from "no exits" and the one from the
thresholds in use). Run it on an idle machine: it measures one core's speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from controller.tuner import ThresholdTuner
from workload.controller_load import synthetic_verdicts


def tuning_ms(confidence: np.ndarray, prediction: np.ndarray, final: np.ndarray, exit_ms: np.ndarray,
              repeats: int = 5) -> tuple[float, float]:
    """Median milliseconds of one tuning from scratch and of one from the thresholds it found.

    Args:
        confidence: ``[R, N]`` per ramp and sample; prediction: ``[R, N]``; final: ``[N]``.
        exit_ms: ``[R + 1]`` latency of answering at each ramp and at the final layer.
        repeats: tunings of each kind; the median is reported.
    """
    tuner = ThresholdTuner()
    cold, warm = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        tuned = tuner.tune(confidence, prediction, final, exit_ms)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        tuner.tune(confidence, prediction, final, exit_ms, current=tuned)
        warm.append(time.perf_counter() - started)
    return 1000 * float(np.median(cold)), 1000 * float(np.median(warm))


def synthetic_window(ramps: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Confidence, prediction, final and exit costs (ms; the final layer costs 10) of ``ramps`` evenly spaced ramps."""
    depth = np.arange(1, ramps + 1) / (ramps + 1)
    confidence, prediction, final = synthetic_verdicts(depth, samples, np.random.default_rng(seed))
    return confidence, prediction, final, 10.0 * np.append(depth, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.tuner_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ramps", default="4,8,16,27", help="comma-separated ramp counts")
    parser.add_argument("--samples", default="1000,2000", help="comma-separated window sizes")
    parser.add_argument("--windows", type=int, default=3, help="synthetic windows (seeds) per size")
    parser.add_argument("--repeats", type=int, default=7, help="tunings of each kind per window")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table to this file")
    args = parser.parse_args(argv)
    lines = ["| ramps | samples | from scratch, ms (median over windows; range) | from the tuned thresholds, ms |",
             "|---:|---:|---:|---:|"]
    for ramps in (int(r) for r in args.ramps.split(",")):
        for samples in (int(n) for n in args.samples.split(",")):
            costs = np.array([tuning_ms(*synthetic_window(ramps, samples, seed), repeats=args.repeats)
                              for seed in range(args.windows)])
            cold, warm = costs[:, 0], costs[:, 1]
            lines.append(f"| {ramps} | {samples:,} | {np.median(cold):.1f} ({cold.min():.1f}-{cold.max():.1f}) | "
                         f"{np.median(warm):.1f} ({warm.min():.1f}-{warm.max():.1f}) |")
            print(lines[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
