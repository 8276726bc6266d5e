"""``python -m controller``: the Apparate control loop (feedback → thresholds → Redis)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from controller.adjuster import AdjusterSettings
from controller.e3_resizer import ResizerSettings
from controller.guard import AccuracyGuard
from controller.model_controller import ControllerSettings
from controller.service import ControllerService
from controller.tuner import TunerSettings
from early_exit.keys import DEFAULT_PREFIX
from early_exit.redis_connection import redis_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller",
        description="Read per-exit feedback from Redis Streams, tune exit thresholds so accuracy vs the original "
        "model stays within the budget, and publish versioned configurations the Triton backend hot-reloads.",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="Redis key namespace")
    parser.add_argument("--model", action="append", default=None, help="control only these models (repeatable)")
    parser.add_argument("--budget", type=float, default=AccuracyGuard.budget,
                        help="maximum accuracy loss vs the original model")
    parser.add_argument("--window", type=int, default=ControllerSettings.window,
                        help="feedback window in samples: thresholds are tuned on all of it while its two halves "
                        "agree alike under them, else on its newer half")
    parser.add_argument("--min-fresh", type=int, default=256, help="new samples needed before re-tuning")
    parser.add_argument(
        "--z", type=float, default=AccuracyGuard.z,
        help="normal quantile of the lower confidence bound on window accuracy that must stay >= 1 - budget "
        "(1.0: one-sided 84%%; 1.645: 95%%; 0: point estimate, as in the paper); the thresholds must also hold on "
        "the half of the window they were not chosen on. Exits are switched off for not paying only when their "
        "measured loss exceeds this many standard errors",
    )
    parser.add_argument("--adjust-every", type=int, default=ControllerSettings.adjust_every,
                        help="judge the ramp set on measured latency every N tuning rounds (0: never)")
    parser.add_argument("--probe-after", type=float, default=ControllerSettings.probe_after,
                        help="seconds exits stay off after they stopped paying before they are tried again")
    parser.add_argument("--overhead-budget", type=float, default=0.02, help="max ramp overhead vs vanilla latency")
    parser.add_argument("--max-ramps", type=int, default=4, help="max active ramps")
    parser.add_argument("--consumer", default=None,
                        help="this controller's name in the feedback consumer group; keep it across restarts "
                        "(default: the host name)")
    parser.add_argument("--claim-idle", type=float, default=30.0,
                        help="seconds before feedback read but never acknowledged (its reader died) is claimed")
    parser.add_argument("--lease-ttl", type=float, default=5.0,
                        help="seconds of the Redis lease that makes one of several controllers the active one; the "
                        "others stand by, retry every third of it, and take over once a dead holder's lease lapsed")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--resize-drift", type=float, default=ResizerSettings.drift,
                        help="re-size an E3 entry's block models (queue delays, replicas) when the share of requests "
                        "reaching one of them moved this much from what they were sized for")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ControllerSettings(
        tuner=TunerSettings(guard=AccuracyGuard(args.budget, args.z)),
        window=args.window,
        min_fresh=args.min_fresh,
        adjust_every=args.adjust_every,
        probe_after=args.probe_after,
        max_probe_after=max(args.probe_after, ControllerSettings.max_probe_after),
        adjuster=AdjusterSettings(overhead_budget=args.overhead_budget, max_ramps=args.max_ramps),
        resizer=ResizerSettings(drift=args.resize_drift),
    )
    client = redis_client(args.redis_url, socket_timeout=5, socket_connect_timeout=2)
    service = ControllerService(client, settings, prefix=args.prefix, models=args.model, consumer=args.consumer,
                                claim_idle=args.claim_idle, lease_ttl=args.lease_ttl)
    # Kubernetes stops a pod with SIGTERM: stop as on Ctrl-C, so the lease is released and the stand-by takes over
    # at once instead of after the lease time.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        service.run(stop_after=args.duration)
    except KeyboardInterrupt:
        logging.getLogger("controller").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
