"""Bootstrap data for ``prepare``: unlabeled inputs, turned into exactly the tensors the served entry takes.

Ramps are trained on the model's own predictions, so any representative inputs will do. Accepted sources:

- built-in data sets by name: ``cifar10``, ``digits`` (images) and ``sst2`` (text);
- a folder of JPEG/PNG images (searched recursively), decoded and resized like the served ``<name>_preprocess`` entry does;
- a text file: ``.txt`` (one input per line) or ``.csv`` / ``.tsv`` / ``.jsonl`` (one input per row, in
  ``text_column``), tokenised with the model's own tokenizer, like its ``<name>_preprocess`` entry does;
- an ``.npz`` of ready tensors, one array per model input, named like the model's ``forward`` parameters.

Built-in sets contribute their leading ``fraction`` (the paper's "first 10 %"; their order is interleaved). Your own
inputs are used whole by default and drawn in a seeded random order, because folders and files are often grouped
(by class, by source) and ramps must see every kind of input in both the training and the validation split.
Images that do not decode are skipped with a count in the log; every other defect stops ``prepare`` with a message.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from early_exit.manifest import TensorSpec
from early_exit.model_config import TRITON_DTYPES as SERVABLE_DTYPES
from triton_backend.raw_inputs import IMAGE_INPUT, TEXT_INPUTS, TextEncoder, decode_image

LOGGER = logging.getLogger(__name__)

BUILT_IN = ("cifar10", "digits", "sst2")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
TEXT_SUFFIXES = frozenset({".txt", ".jsonl", *TABLE_DELIMITERS})
BUILT_IN_FRACTION = 0.1
MIN_SAMPLES = 2  # at least one to train ramps on and one to validate them on


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap data as served tensors: ``arrays`` are in ``inputs`` order, sample-major."""

    inputs: tuple[TensorSpec, ...]
    primary: str
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, index: slice, batch_size: int = 250) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
        def iterate() -> Iterator[dict[str, torch.Tensor]]:
            selected = {name: array[index] for name, array in self.arrays.items()}
            total = len(next(iter(selected.values())))
            for start in range(0, total, batch_size):
                yield {name: torch.from_numpy(a[start : start + batch_size]) for name, a in selected.items()}

        return iterate


@dataclass(frozen=True)
class BootstrapOptions:
    """How to read the bootstrap data.

    Args:
        fraction: share of the inputs used; ``None``: 10 % of a built-in set, all of your own inputs.
        limit: use at most this many inputs.
        data_dir: folder of a built-in set's files (``None``: its default location).
        image_size: ``(height, width)`` images are resized to; required for an image folder.
        text_column: column (CSV/TSV header) or key (JSONL) holding the text.
        seed: seeds the order in which your own inputs are drawn.
    """

    fraction: float | None = None
    limit: int | None = None
    data_dir: Path | None = None
    image_size: tuple[int, int] | None = None
    text_column: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise SystemExit(f"--bootstrap-fraction must be in (0, 1], got {self.fraction}")
        if self.limit is not None and self.limit < MIN_SAMPLES:
            raise SystemExit(f"--limit must be at least {MIN_SAMPLES}, got {self.limit}")
        if self.image_size is not None and min(self.image_size) < 1:
            raise SystemExit(f"--image-size must be positive, got {self.image_size}")


def _chosen(total: int, options: BootstrapOptions, built_in: bool) -> np.ndarray:
    """Indices of the inputs to use: the leading share of a built-in set, a seeded random draw of your own."""
    fraction = options.fraction or (BUILT_IN_FRACTION if built_in else 1.0)
    count = min(total, options.limit or total, max(10, round(total * fraction)))
    if count < MIN_SAMPLES:
        raise SystemExit(f"the bootstrap needs at least {MIN_SAMPLES} inputs, found {count}")
    if built_in:
        return np.arange(count)
    return np.sort(np.random.default_rng(options.seed).permutation(total)[:count])


def _image_bootstrap(images: np.ndarray) -> Bootstrap:
    return Bootstrap((TensorSpec(IMAGE_INPUT, "uint8", tuple(int(d) for d in images.shape[1:])),), IMAGE_INPUT,
                     {IMAGE_INPUT: images})


def _text_bootstrap(texts: list[str], encoder: TextEncoder) -> Bootstrap:
    tokens = encoder.encode(texts)
    specs = tuple(TensorSpec(name, "int64", (encoder.max_length,)) for name in TEXT_INPUTS)
    return Bootstrap(specs, TEXT_INPUTS[0], tokens)


def _image_folder(folder: Path, options: BootstrapOptions) -> Bootstrap:
    if options.image_size is None:
        raise SystemExit(f"--data {folder} is an image folder: give --image-size H W, the size the served entry "
                         "takes (images are resized to it)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"--data {folder}: no {'/'.join(sorted(IMAGE_SUFFIXES))} files in it or its subfolders")
    height, width = options.image_size
    images: list[np.ndarray] = []
    undecodable: list[Path] = []
    for index in _chosen(len(files), options, built_in=False):
        try:
            images.append(decode_image(files[index].read_bytes(), height, width))
        except ValueError:
            undecodable.append(files[index])
    if undecodable:
        LOGGER.warning("skipped %d of %d files that do not decode as images, e.g. %s", len(undecodable),
                       len(undecodable) + len(images), ", ".join(str(p) for p in undecodable[:3]))
    if len(images) < MIN_SAMPLES:
        raise SystemExit(f"--data {folder}: {len(images)} decodable images, need at least {MIN_SAMPLES}")
    return _image_bootstrap(np.stack(images))


def _jsonl_texts(path: Path, lines: list[str], key: str | None) -> list[str]:
    if key is None:
        raise SystemExit(f"--data {path}: give --text-column, the key holding the text")
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line).get(key)
        except (json.JSONDecodeError, AttributeError) as exc:
            raise SystemExit(f"--data {path} line {number}: not a JSON object: {exc}") from exc
        if not isinstance(value, str):
            raise SystemExit(f"--data {path} line {number}: no text under key {key!r}")
        texts.append(value)
    return texts


def _table_texts(path: Path, content: str, column: str | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=TABLE_DELIMITERS[path.suffix.lower()])
    columns = reader.fieldnames or []
    if column is None and len(columns) == 1:
        column = columns[0]
    if column not in columns:
        raise SystemExit(f"--data {path}: --text-column {column!r} is not one of its columns {columns}")
    return [row[column] or "" for row in reader]


def read_texts(path: Path, column: str | None) -> list[str]:
    """Every input of a text file, in file order."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"--data {path} is not UTF-8 text: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in content.splitlines() if line.strip()]
    if suffix == ".jsonl":
        return _jsonl_texts(path, content.splitlines(), column)
    return _table_texts(path, content, column)


def _text_file(path: Path, options: BootstrapOptions, encoder: TextEncoder | None) -> Bootstrap:
    if encoder is None:
        raise SystemExit(f"--data {path} is text, and the model brings no tokenizer: use a Hugging Face folder with "
                         "tokenizer.json as --model, or pass token ids as an .npz")
    texts = read_texts(path, options.text_column)
    if not texts:
        raise SystemExit(f"--data {path}: no inputs in it")
    return _text_bootstrap([texts[i] for i in _chosen(len(texts), options, built_in=False)], encoder)


def _npz(path: Path, options: BootstrapOptions, input_names: list[str] | None) -> Bootstrap:
    """Arrays matched to the model's inputs by name (any case); Triton input names are their upper-case forms."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if not arrays:
        raise SystemExit(f"--data {path}: no arrays in it")
    if input_names is None:  # the model takes *inputs: the archive's order is the order
        names = list(arrays)
    else:
        by_name = {name.lower(): name for name in arrays}
        if sorted(by_name) != sorted(n.lower() for n in input_names) or len(by_name) != len(arrays):
            raise SystemExit(f"--data {path}: arrays {sorted(arrays)} must be named like the model's inputs "
                             f"{input_names} (one array each, any case)")
        names = [by_name[n.lower()] for n in input_names]
    lengths = {len(arrays[n]) if arrays[n].ndim else 0 for n in names}
    if len(lengths) != 1 or 0 in lengths:
        raise SystemExit(f"--data {path}: every array needs the same number of samples along its first axis, got "
                         + ", ".join(f"{n} {arrays[n].shape}" for n in names))
    for name in names:
        if arrays[name].dtype.name not in SERVABLE_DTYPES:
            raise SystemExit(f"--data {path}: array {name} is {arrays[name].dtype}; Triton entries take "
                             f"{', '.join(SERVABLE_DTYPES)}")
    chosen = _chosen(lengths.pop(), options, built_in=False)
    specs = tuple(TensorSpec(n.upper(), arrays[n].dtype.name, tuple(int(d) for d in arrays[n].shape[1:]))
                  for n in names)
    return Bootstrap(specs, specs[0].name, {spec.name: arrays[n][chosen] for spec, n in zip(specs, names)})


def _built_in(name: str, options: BootstrapOptions, encoder: TextEncoder | None, max_length: int) -> Bootstrap:
    from model_zoo.datasets import DEFAULT_CIFAR_DIR, cifar10_available, load_image_set, load_sst2

    if name == "auto":
        name = "cifar10" if cifar10_available(options.data_dir or DEFAULT_CIFAR_DIR) else "digits"
        LOGGER.info("using data set %s", name)
    if name == "sst2":
        from model_zoo.minilm_sst2 import text_encoder

        text = load_sst2("train", options.data_dir) if options.data_dir else load_sst2("train")
        chosen = _chosen(len(text), options, built_in=True)
        return _text_bootstrap([text.sentences[i] for i in chosen], encoder or text_encoder(max_length))
    images = load_image_set(name, "train", options.data_dir).images
    return _image_bootstrap(images[_chosen(len(images), options, built_in=True)])


def load_bootstrap(
    data: str,
    options: BootstrapOptions,
    encoder: TextEncoder | None = None,
    input_names: list[str] | None = None,
    max_length: int = 64,
) -> Bootstrap:
    """Read ``data`` (a built-in name, ``auto``, an image folder, a text file or an ``.npz``) as served tensors.

    Args:
        data: what ``--data`` says.
        options: sampling and decoding options.
        encoder: the model's own tokenizer, for text (``sst2`` falls back to the MiniLM reference's).
        input_names: the model's ``forward`` parameters, to match ``.npz`` arrays to (``None``: any names).
        max_length: tokens per text when ``sst2`` uses the MiniLM tokenizer.

    Raises:
        SystemExit: with a message naming the problem, for anything that cannot become bootstrap tensors.
    """
    if data in (*BUILT_IN, "auto"):
        return _built_in(data, options, encoder, max_length)
    path = Path(data)
    if path.is_dir():
        return _image_folder(path, options)
    if not path.is_file():
        raise SystemExit(f"--data {data!r}: not a built-in data set ({', '.join(BUILT_IN)}, auto), a folder or a file")
    if path.suffix.lower() in TEXT_SUFFIXES:
        return _text_file(path, options, encoder)
    if path.suffix.lower() == ".npz":
        return _npz(path, options, input_names)
    raise SystemExit(f"--data {path}: unsupported file type {path.suffix!r}; expected an image folder, "
                     f"{', '.join(sorted(TEXT_SUFFIXES))} or .npz")
