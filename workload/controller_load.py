"""Controller CPU at a fixed feedback rate: is the controller cheap enough to share a CPU with the server it tunes?

Starts a real ``redis-server`` and the real controller process, registers a prepared entry's manifest through the
backend's own :class:`FeedbackPublisher`, and publishes batches of feedback at ``--rate`` samples per second. The
records follow the configuration the controller publishes, as the backend's do: its version, its active ramps, the
exit each sample takes under its thresholds (the shared exit rule), and answer times from the entry's latency profile.
Confidences and ramp predictions are synthetic (:func:`synthetic_verdicts`), so the controller has real tuning work to
do: the point is its cost, not the thresholds it finds. Ramp-set judging is off (``--adjust-every 0``): on synthetic
timings it would switch exits off and park the controller, which would understate its cost. The figure reported is the
controller process's CPU seconds over the measured wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from tqdm import tqdm

from controller.config_store import read_config
from controller.latency import LatencyModel
from early_exit.exit_config import ExitConfig
from early_exit.exit_rule import first_exit
from early_exit.feedback import BatchTiming, FeedbackRecord
from early_exit.keys import RedisKeys
from early_exit.manifest import Manifest, load_manifest
from triton_backend.feedback_publisher import FeedbackPublisher
from workload.stack import free_port, start_controller, start_redis


def synthetic_verdicts(depth: np.ndarray, n: int, rng: np.random.Generator,
                       classes: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidences and predictions ``[R, n]`` of ramps at relative ``depth`` ``[R]`` (in (0, 1)), and the original
    model's predictions ``[n]``: deeper ramps are more confident and agree more often, and a confident ramp agrees
    more often than an unsure one."""
    final = rng.integers(0, classes, n)
    confidence = rng.beta(1.0 + 4.0 * depth[:, None], 1.5, (len(depth), n)).astype(np.float32)
    agrees = rng.random((len(depth), n)) < np.clip(0.35 + 0.6 * depth[:, None] + 0.3 * (confidence - 0.5), 0, 1)
    return confidence, np.where(agrees, final, (final + 1) % classes), final


class SyntheticBatches:
    """Feedback batches for ``manifest``'s ramps under whatever configuration is current.

    Args:
        manifest: the entry whose ramps and latency profile the records describe.
        batch_size: samples per record.
        utilisation: share of time the simulated instance is busy (sets ``idle_ms``).
        seed: random seed.
    """

    def __init__(self, manifest: Manifest, batch_size: int, utilisation: float, seed: int = 0) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.utilisation = utilisation
        self.latency = LatencyModel.from_manifest(manifest, batch_size)
        self.rng = np.random.default_rng(seed)
        self.classes = 10

    def record(self, config: ExitConfig) -> FeedbackRecord:
        ramps = config.active_ramps
        depth = (np.array(ramps, dtype=float) + 1) / (len(self.manifest.ramps) + 1)
        confidence, prediction, final = synthetic_verdicts(depth, self.batch_size, self.rng, self.classes)
        thresholds = np.array([config.thresholds[r] for r in ramps])
        first = first_exit(confidence, thresholds)
        exit_ms = self.latency.exit_latencies(list(ramps))
        answer_ms = exit_ms[first].astype(np.float32)
        batch_ms = float(exit_ms[-1])
        return FeedbackRecord(
            model=config.model, config_version=config.version, ramps=ramps, confidence=confidence,
            prediction=prediction.astype(np.int32), final=final.astype(np.int32),
            exit=np.where(first < len(ramps), np.array(ramps + (0,))[first], self.manifest.final_exit).astype(np.int16),
            timing=BatchTiming(batch_ms, batch_ms * self.latency.overhead_fraction(list(ramps)),
                               batch_ms * (1 / self.utilisation - 1), answer_ms),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.controller_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", type=Path, required=True, help="a prepared early-exit entry's version folder")
    parser.add_argument("--rate", type=float, default=200.0, help="feedback samples per second")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per feedback record")
    parser.add_argument("--seconds", type=float, default=120.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring (window fills)")
    parser.add_argument("--utilisation", type=float, default=0.25, help="simulated server utilisation")
    parser.add_argument("--out", type=Path, default=None, help="append the result line to this markdown file")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.entry)
    keys = RedisKeys(manifest.name)
    batches = SyntheticBatches(manifest, args.batch_size, args.utilisation)
    interval = args.batch_size / args.rate
    log_dir = Path(tempfile.mkdtemp(prefix="controller-load-"))
    port = free_port()
    redis_server = start_redis(port, log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    publisher = FeedbackPublisher(redis.Redis.from_url(url), keys, manifest.to_json())
    controller = start_controller(url, log_dir, extra=["--adjust-every", "0"])
    try:
        config = ExitConfig(manifest.name, 0, dict(manifest.initial_thresholds))
        total = args.warmup + args.seconds
        started = time.monotonic()
        cpu_at_start = None
        sent = 0
        with tqdm(total=int(total), desc=f"feedback at {args.rate:.0f} samples/s", unit="s") as progress:
            while (elapsed := time.monotonic() - started) < total:
                if cpu_at_start is None and elapsed >= args.warmup:
                    cpu_at_start, measured_from = controller.cpu_seconds(), time.monotonic()
                if sent % max(1, int(1 / interval)) == 0:  # follow the published configuration, once a second
                    config = read_config(client, keys) or config
                publisher.offer(batches.record(config))
                sent += 1
                progress.n = int(elapsed)
                progress.refresh()
                time.sleep(max(0.0, started + sent * interval - time.monotonic()))
        wall = time.monotonic() - measured_from
        cpu = controller.cpu_seconds() - cpu_at_start
        if controller.popen.poll() is not None:
            raise SystemExit(f"the controller exited early; its log: {controller.log}")
    finally:
        publisher.close()
        controller.stop()
        redis_server.stop()
    rounds = controller.log.read_text().count("served agreement")  # one log line per tuning round
    line = (f"| {manifest.name} | {len(manifest.ramps)} | {args.rate:.0f} | {args.batch_size} | {wall:.0f} | "
            f"{cpu:.2f} | {100 * cpu / wall:.2f} % | {rounds} | {config.version} |")
    header = ("| model | candidate ramps | samples/s | batch | measured s | controller CPU s | CPU share of one core "
              "| rounds logged | last config version |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    print(header + line)
    if args.out is not None:
        new_file = not args.out.exists()
        with args.out.open("a") as out:
            out.write((header if new_file else "") + line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
