"""Raw request payloads (encoded images, UTF-8 text) → the fixed-shape tensors an early-exit entry takes.

The preprocessing models of the ``<name>_pipeline`` ensembles and ``prepare``'s bootstrap both call these functions,
so ramps are trained on exactly the tensors the served pipeline produces. Kept free of ``triton_python_backend_utils``
(which exists only inside Triton's stub) so that code outside the server can import it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

IMAGE_INPUT = "IMAGE"
TEXT_INPUTS = ("INPUT_IDS", "ATTENTION_MASK")
TOKENIZER_FILE = "tokenizer.json"  # a text preprocessing entry's tokenizer, in its version folder
# Largest image decoded (pixels): a few KB of PNG can declare billions of pixels, and decoding one would take the
# stub's memory and the batch's time. 40 megapixels is above any camera a classifier is fed from.
MAX_IMAGE_PIXELS = 40_000_000


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode to RGB uint8 ``[height, width, 3]``, resizing (bilinear) when the image has another size.

    Raises:
        ValueError: when ``data`` is not a decodable image or has more than ``MAX_IMAGE_PIXELS`` pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width_in, height_in = image.size
            if width_in * height_in > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {width_in}x{height_in} pixels is larger than the {MAX_IMAGE_PIXELS} "
                                 "pixels accepted")
            rgb = image.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes means "not an image"
        raise ValueError(f"not a decodable image ({len(data)} bytes): {exc!r}") from exc
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


class TextEncoder:
    """A ``tokenizers`` tokenizer fixed to one sequence length: every text becomes exactly ``max_length`` ids.

    Served tensors have fixed shapes apart from the batch (Triton's dynamic batcher only merges equal shapes), so
    texts are truncated or padded to ``max_length``; special tokens come from the tokenizer's own post-processor.

    Args:
        tokenizer: a fast tokenizer (``tokenizer.json``); this encoder owns it and sets its truncation and padding.
        max_length: tokens per text, special tokens included.
        pad_id: id of the padding token; it must be the model's (RoBERTa, for one, derives position ids from it).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_id: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        pad_token = tokenizer.id_to_token(pad_id)
        if pad_token is None:
            raise ValueError(f"pad id {pad_id} is not in the tokenizer's vocabulary")
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id

    @classmethod
    def from_file(cls, path: Path, max_length: int, pad_id: int) -> TextEncoder:
        """Load ``tokenizer.json`` (the format ``tokenizers`` and Hugging Face fast tokenizers save)."""
        return cls(Tokenizer.from_file(str(path)), max_length, pad_id)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts → int64 ``INPUT_IDS`` and ``ATTENTION_MASK``, both ``[N, max_length]``."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(-1, self.max_length)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64).reshape(-1, self.max_length)
        return dict(zip(TEXT_INPUTS, (ids, mask)))
