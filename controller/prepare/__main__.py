"""``python -m controller.prepare``: add early-exit ramps to a trained classifier and export Triton entries."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from controller.guard import AccuracyGuard
from controller.prepare.bootstrap import BUILT_IN, BootstrapOptions, load_bootstrap
from controller.prepare.pipeline import PrepareSettings, RampReport, prepare
from controller.prepare.raw_pipeline import servable_image, write_image_pipeline, write_text_pipeline
from controller.prepare.sources import forward_inputs, load_model, output_classes
from early_exit.model_config import vanilla_twin

LOGGER = logging.getLogger("controller.prepare")


def _print_summary(reports: list[RampReport]) -> None:
    """Per candidate: position, cost at the reference batch, agreement with the original model on the validation
    split (all samples), the share it could answer alone within the budget, and the share of validation samples
    answered there by the initial configuration."""
    print(f"\n{'ramp':>4}  {'cut point':<26} {'depth':>6} {'cost ms':>8} {'acc vs orig':>11} {'alone':>6} "
          f"{'exits':>6}  chosen")
    for r in reports:
        print(
            f"{r.ramp_id:>4}  {r.label:<26} {r.depth:>6.1%} {r.cost_ms:>8.3f} {r.accuracy:>11.2%} "
            f"{r.answerable:>6.1%} {r.exit_rate:>6.1%}  {'yes' if r.chosen else ''}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.prepare",
        description="Find cut points, train candidate ramps on the model's own predictions (no labels), profile "
        "them and write <repository>/<name> (early-exit) and <repository>/<name>_vanilla (baseline) Triton entries.",
    )
    parser.add_argument("--model", default="model_zoo.cifar_resnet:CifarResNet",
                        help="package.module:factory | torchvision:<name> | Hugging Face sequence-classifier folder "
                        "(with its tokenizer.json; also writes <name>_preprocess and the <name>_pipeline ensemble "
                        "that takes raw text) | file.onnx. Image models take uint8 HWC RGB pixels.")
    parser.add_argument("--checkpoint", type=Path, default=None, help="safetensors state dict for the model")
    parser.add_argument("--name", required=True, help="Triton model name, e.g. cifar10_resnet")
    parser.add_argument("--data", default="auto", metavar="DATA",
                        help="unlabeled bootstrap inputs (the model's own predictions train the ramps): a built-in "
                        f"set ({', '.join(BUILT_IN)}; auto: cifar10 when present, else digits), a folder of JPEG/PNG "
                        "images (recursive; needs --image-size; files that do not decode are skipped and counted), "
                        "a text file (.txt: one input per line; .csv/.tsv/.jsonl: see --text-column) or an .npz "
                        "with one array per model input, named like the model's forward() parameters")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder of a built-in data set's files")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size images from a folder are resized to: the IMAGE input of the served entry")
    parser.add_argument("--text-column", default=None,
                        help="CSV/TSV column or JSONL key holding the text (a one-column CSV/TSV needs none)")
    parser.add_argument("--max-length", type=int, default=64,
                        help="tokens per text (padded or truncated): the served INPUT_IDS/ATTENTION_MASK length")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--bootstrap-fraction", type=float, default=None,
                        help="share of the data used (default: the leading 10%% of a built-in set, all of your own "
                        "inputs, drawn in a seeded random order)")
    parser.add_argument("--train-share", type=float, default=0.5,
                        help="share of the bootstrap that trains ramps; the rest, taken from its start (for a "
                        "built-in set, the leading 10%% the reference backbones never trained on), validates them "
                        "and tunes the initial thresholds")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--overhead-budget", type=float, default=0.02, help="initial ramps' max added latency")
    parser.add_argument("--accuracy-budget", type=float, default=AccuracyGuard.budget,
                        help="maximum accuracy loss vs the original model for the initial thresholds")
    parser.add_argument("--z", type=float, default=AccuracyGuard.z,
                        help="lower-confidence-bound quantile of the accuracy guard (the controller's default)")
    parser.add_argument("--ramp-epochs", type=int, default=100)
    parser.add_argument("--instance-kind", choices=("cpu", "gpu"), default="cpu",
                        help="Triton instance_group kind of the entries; gpu also profiles latency on this machine's "
                        "GPU, which must be the serving one (see docs/gpu.md)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many bootstrap samples (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = load_model(args.model, args.checkpoint)
    options = BootstrapOptions(args.bootstrap_fraction, args.limit, args.data_dir,
                               tuple(args.image_size) if args.image_size else None, args.text_column)
    encoder = source.tokenizer.encoder(args.max_length) if source.tokenizer else None
    bootstrap = load_bootstrap(args.data, options, encoder, forward_inputs(source.module), args.max_length)
    # Validation takes the leading inputs: thresholds checked on inputs the backbone memorised would be looser than
    # serving allows. Ramps may learn from such inputs: on CIFAR, 20,000 training images (15,000 of them seen by the
    # backbone) taught 4x4 ramps that agree with it on test images 2-8 points more than 2,500 unseen ones did.
    train = min(max(1, int(len(bootstrap) * args.train_share)), len(bootstrap) - 1)
    validate = len(bootstrap) - train
    LOGGER.info("bootstrap: %d samples (%d train ramps, %d validate)", len(bootstrap), train, validate)
    classes = output_classes(source.module, next(bootstrap.batches(slice(0, 2))()))
    settings = PrepareSettings(
        max_batch_size=args.max_batch_size,
        overhead_budget=args.overhead_budget,
        guard=AccuracyGuard(args.accuracy_budget, args.z),
        ramp_epochs=args.ramp_epochs,
        instance_kind="KIND_GPU" if args.instance_kind == "gpu" else "KIND_CPU",
    )
    manifest, reports = prepare(
        source.module, args.name, bootstrap.inputs, bootstrap.primary, classes,
        bootstrap.batches(slice(validate, None)), bootstrap.batches(slice(0, validate)), args.repository, settings,
    )
    entries = [args.name, vanilla_twin(args.name)]
    if source.tokenizer is not None:
        sequence_length = bootstrap.inputs[0].shape[0]  # INPUT_IDS, as prepared (an .npz may set its own)
        entries += write_text_pipeline(args.repository, args.name, source.tokenizer, sequence_length, classes,
                                       args.max_batch_size)
    elif (image := servable_image(bootstrap.inputs)) is not None:
        entries += write_image_pipeline(args.repository, args.name, image, classes, args.max_batch_size)
    _print_summary(reports)
    print(f"\nwrote {', '.join(str(args.repository / e) for e in entries)}; "
          f"initial ramps {sorted(manifest.initial_thresholds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
