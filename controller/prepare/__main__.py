"""``python -m controller.prepare``: add early-exit ramps to a trained classifier and export Triton entries."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from controller.guard import AccuracyGuard
from controller.prepare.pipeline import PrepareSettings, RampReport, prepare
from controller.prepare.sources import load_bootstrap, load_model
from model_zoo.datasets import DEFAULT_CIFAR_DIR, cifar10_available

LOGGER = logging.getLogger("controller.prepare")


def _print_summary(reports: list[RampReport]) -> None:
    """Per candidate: position, cost at the reference batch, agreement with the original model on the validation
    split (all samples), and the share of validation samples answered there by the initial configuration."""
    print(f"\n{'ramp':>4}  {'cut point':<26} {'depth':>6} {'cost ms':>8} {'acc vs orig':>11} {'exits':>6}  chosen")
    for r in reports:
        print(
            f"{r.ramp_id:>4}  {r.label:<26} {r.depth:>6.1%} {r.cost_ms:>8.3f} {r.accuracy:>11.2%} "
            f"{r.exit_rate:>6.1%}  {'yes' if r.chosen else ''}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.prepare",
        description="Find cut points, train candidate ramps on the model's own predictions (no labels), profile "
        "them and write <repository>/<name> (early-exit) and <repository>/<name>_vanilla (baseline) Triton entries.",
    )
    parser.add_argument("--model", default="model_zoo.cifar_resnet:CifarResNet",
                        help="package.module:factory | torchvision:<name> | Hugging Face folder | file.onnx")
    parser.add_argument("--checkpoint", type=Path, default=None, help="safetensors state dict for the model")
    parser.add_argument("--name", required=True, help="Triton model name, e.g. cifar10_resnet")
    parser.add_argument("--data", choices=("cifar10", "digits", "sst2", "auto"), default="auto",
                        help="bootstrap data (auto: cifar10 when present, else digits)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder of the data set's files")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--bootstrap-fraction", type=float, default=0.1, help="leading share of the data used")
    parser.add_argument("--train-share", type=float, default=0.1, help="share of the bootstrap that trains ramps")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--overhead-budget", type=float, default=0.02, help="initial ramps' max added latency")
    parser.add_argument("--accuracy-budget", type=float, default=AccuracyGuard.budget,
                        help="maximum accuracy loss vs the original model for the initial thresholds")
    parser.add_argument("--z", type=float, default=AccuracyGuard.z,
                        help="lower-confidence-bound quantile of the accuracy guard (the controller's default)")
    parser.add_argument("--ramp-epochs", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many bootstrap samples (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset = args.data
    if dataset == "auto":
        dataset = "cifar10" if cifar10_available(args.data_dir or DEFAULT_CIFAR_DIR) else "digits"
        LOGGER.info("using data set %s", dataset)
    bootstrap = load_bootstrap(dataset, args.data_dir, args.bootstrap_fraction, args.limit)
    split = max(1, int(len(bootstrap) * args.train_share))
    LOGGER.info("bootstrap: %d samples (%d train ramps, %d validate)", len(bootstrap), split, len(bootstrap) - split)
    model = load_model(args.model, args.checkpoint)
    settings = PrepareSettings(
        max_batch_size=args.max_batch_size,
        overhead_budget=args.overhead_budget,
        guard=AccuracyGuard(args.accuracy_budget, args.z),
        ramp_epochs=args.ramp_epochs,
    )
    manifest, reports = prepare(
        model, args.name, bootstrap.inputs, bootstrap.primary, bootstrap.classes,
        bootstrap.batches(slice(0, split)), bootstrap.batches(slice(split, None)), args.repository, settings,
    )
    _print_summary(reports)
    print(f"\nwrote {args.repository / args.name} and {args.repository / (args.name + '_vanilla')}; "
          f"initial ramps {sorted(manifest.initial_thresholds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
