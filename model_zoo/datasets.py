"""Image and text data sets read from local files only (no downloads).

CIFAR-10 comes as tarballs of JPEG folders (``<split>/<class>/NNNN.jpg``); decoding 60k JPEGs takes a while, so
the decoded arrays are cached as ``.npz`` next to a build directory. When CIFAR-10 is absent, scikit-learn's bundled
8x8 digits stand in, upscaled to the same 32x32x3 uint8 layout so every model and config stays identical.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
DEFAULT_SST2_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "build" / "data"


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 ``[N, 32, 32, 3]`` (HWC, RGB) with int64 labels ``[N]``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TextSet:
    """Sentences with int64 labels."""

    name: str
    sentences: list[str]
    labels: np.ndarray
    classes: tuple[str, ...] = ("negative", "positive")

    def __len__(self) -> int:
        return len(self.labels)


def _decode_cifar_tarball(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    entries: list[tuple[int, int, np.ndarray]] = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            label = CIFAR10_CLASSES.index(parts[1])
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
            entries.append((int(Path(parts[2]).stem), label, pixels))
    # Interleave classes in the original per-class order so that any prefix holds every class.
    entries.sort(key=lambda e: (e[0], e[1]))
    images = np.stack([e[2] for e in entries])
    labels = np.asarray([e[1] for e in entries], dtype=np.int64)
    return images, labels


def load_cifar10(split: str, data_dir: Path = DEFAULT_CIFAR_DIR, cache_dir: Path = DEFAULT_CACHE_DIR) -> ImageSet:
    """Load the ``train`` or ``test`` split, decoding the JPEG tarball once and caching the arrays.

    Raises:
        FileNotFoundError: when ``<data_dir>/<split>.tar.gz`` does not exist.
    """
    tarball = Path(data_dir) / f"{split}.tar.gz"
    if not tarball.is_file():
        raise FileNotFoundError(f"CIFAR-10 {split} split not found at {tarball}")
    cache = Path(cache_dir) / f"cifar10_{split}.npz"
    if cache.is_file() and cache.stat().st_mtime >= tarball.stat().st_mtime:
        arrays = np.load(cache)
        return ImageSet("cifar10", arrays["images"], arrays["labels"], CIFAR10_CLASSES)
    LOGGER.info("decoding %s (cached afterwards at %s)", tarball, cache)
    images, labels = _decode_cifar_tarball(tarball)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, labels=labels)
    return ImageSet("cifar10", images, labels, CIFAR10_CLASSES)


def load_digits(split: str) -> ImageSet:
    """scikit-learn's 1,797 bundled digits as 32x32x3 uint8 images; ``train`` is the first 80 %, ``test`` the rest."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    gray = (bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], values 0..16
    images = np.repeat(np.repeat(gray, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=3)
    labels = bunch.target.astype(np.int64)
    cut = int(0.8 * len(labels))
    index = slice(0, cut) if split == "train" else slice(cut, None)
    return ImageSet("digits", images[index], labels[index], tuple(str(d) for d in range(10)))


def load_image_set(dataset: str, split: str, data_dir: Path | None = None) -> ImageSet:
    """Load ``cifar10`` or ``digits`` by name."""
    if dataset == "cifar10":
        return load_cifar10(split, data_dir or DEFAULT_CIFAR_DIR)
    if dataset == "digits":
        return load_digits(split)
    raise ValueError(f"unknown image data set {dataset!r}; expected 'cifar10' or 'digits'")


def cifar10_available(data_dir: Path = DEFAULT_CIFAR_DIR) -> bool:
    return (Path(data_dir) / "train.tar.gz").is_file() and (Path(data_dir) / "test.tar.gz").is_file()


def load_sst2(split: str, data_dir: Path = DEFAULT_SST2_DIR) -> TextSet:
    """Load SST-2 ``train`` or ``dev`` from its TSV file (header ``sentence<TAB>label``)."""
    path = Path(data_dir) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"SST-2 {split} split not found at {path}")
    sentences: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            sentence, _, label = line.rstrip("\n").rpartition("\t")
            sentences.append(sentence.strip())
            labels.append(int(label))
    return TextSet("sst2", sentences, np.asarray(labels, dtype=np.int64))
