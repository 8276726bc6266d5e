"""Where ``prepare`` gets models and bootstrap data from: user code, Hugging Face folders, torchvision, ONNX."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from early_exit.manifest import TensorSpec

SEQUENCE_LENGTH = 64


class LogitsOnly(nn.Module):
    """Adapts a Hugging Face sequence classifier to ``forward(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def load_model(source: str, checkpoint: Path | None = None) -> nn.Module:
    """Instantiate the model to prepare.

    Args:
        source: ``package.module:factory`` (any callable returning an ``nn.Module``), ``torchvision:<name>``, a
            Hugging Face folder with ``config.json`` (a sequence classifier), or an ``.onnx`` file.
        checkpoint: optional safetensors state dict loaded into the module.
    """
    path = Path(source)
    if source.endswith(".onnx"):
        from controller.prepare.onnx_import import load_onnx

        model = load_onnx(path)
    elif path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoModelForSequenceClassification

        model = LogitsOnly(AutoModelForSequenceClassification.from_pretrained(str(path), attn_implementation="eager"))
    elif source.startswith("torchvision:"):
        import torchvision

        model = getattr(torchvision.models, source.split(":", 1)[1])()
    else:
        module_name, _, attribute = source.partition(":")
        if not attribute:
            raise SystemExit(f"--model {source!r}: expected package.module:factory, torchvision:<name>, a Hugging "
                             "Face folder or an .onnx file")
        model = getattr(importlib.import_module(module_name), attribute)()
    if checkpoint is not None:
        model.load_state_dict(load_file(str(checkpoint)))
    return model.eval()


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap data as served tensors: ``arrays`` are in ``inputs`` order, sample-major."""

    inputs: tuple[TensorSpec, ...]
    primary: str
    classes: int
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


def load_bootstrap(dataset: str, data_dir: Path | None, fraction: float, limit: int | None) -> Bootstrap:
    """The leading ``fraction`` of a data set's training split, as the tensors the served model takes."""
    from model_zoo.datasets import load_image_set, load_sst2

    if dataset == "sst2":
        from model_zoo.minilm_sst2 import tokenize

        text = load_sst2("train", data_dir) if data_dir else load_sst2("train")
        count = min(max(10, int(len(text) * fraction)), limit or len(text))
        tokens = tokenize(text.sentences[:count], max_length=SEQUENCE_LENGTH)
        inputs = (TensorSpec("INPUT_IDS", "int64", (SEQUENCE_LENGTH,)),
                  TensorSpec("ATTENTION_MASK", "int64", (SEQUENCE_LENGTH,)))
        return Bootstrap(inputs, "INPUT_IDS", 2,
                         {"INPUT_IDS": tokens["input_ids"], "ATTENTION_MASK": tokens["attention_mask"]})
    images = load_image_set(dataset, "train", data_dir)
    count = min(max(10, int(len(images) * fraction)), limit or len(images))
    spec = TensorSpec("IMAGE", "uint8", tuple(int(d) for d in images.images.shape[1:]))
    return Bootstrap((spec,), "IMAGE", len(images.classes), {"IMAGE": images.images[:count]})
