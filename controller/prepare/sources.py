"""Where ``prepare`` gets models from: user code, Hugging Face folders, torchvision, ONNX.

Every source ends up as an ``nn.Module`` that takes the served tensors positionally and returns logits ``[B, C]``:
image models take uint8 HWC RGB pixels (``IMAGE``, normalisation inside the model), text models take
``INPUT_IDS`` and ``ATTENTION_MASK``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from model_zoo.vision import PixelNormalization
from triton_backend.raw_inputs import TextEncoder


class LogitsOnly(nn.Module):
    """Adapts a Hugging Face sequence classifier to ``forward(input_ids, attention_mask) -> logits``.

    Single texts only: ``token_type_ids`` are left to the model's default (all zeros), which is also what
    DistilBERT (no segment embeddings) and RoBERTa (one segment) expect.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageNetPixels(nn.Module):
    """Adapts a torchvision classifier (float NCHW, ImageNet-normalised) to the served ``IMAGE``: uint8 HWC RGB."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.normalize = PixelNormalization()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(image))


@dataclass(frozen=True)
class TokenizerSpec:
    """A text model's own tokenizer.

    Args:
        file: its ``tokenizer.json``.
        pad_id: the padding id the model expects.
        max_length: longest sequence its position embeddings cover (``None``: no limit known).
    """

    file: Path
    pad_id: int
    max_length: int | None

    def encoder(self, max_length: int) -> TextEncoder:
        """The tokenizer fixed to ``max_length`` tokens per text.

        Raises:
            SystemExit: when the model cannot take sequences that long.
        """
        if self.max_length is not None and max_length > self.max_length:
            raise SystemExit(f"--max-length {max_length}: the model's position embeddings cover at most "
                             f"{self.max_length} tokens")
        return TextEncoder.from_file(self.file, max_length, self.pad_id)


@dataclass(frozen=True)
class ModelSource:
    """The model to prepare and, for a text model that brings one, its tokenizer."""

    module: nn.Module
    tokenizer: TokenizerSpec | None = None


def forward_inputs(model: nn.Module) -> list[str] | None:
    """Names of the tensors ``model.forward`` takes, in order; ``None`` when it takes ``*inputs`` (ONNX graphs)."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _pad_id(path: Path, tokenizer: Tokenizer, config_pad_id: int | None) -> int:
    """The one pad id the tokenizer and the model config agree on (either may leave it unset)."""
    candidates = {i for i in (config_pad_id, (tokenizer.padding or {}).get("pad_id")) if i is not None}
    if len(candidates) != 1:
        raise SystemExit(f"{path}: cannot tell the pad id (config.json pad_token_id {config_pad_id}, tokenizer.json "
                         f"padding {tokenizer.padding}); set pad_token_id in config.json")
    return candidates.pop()


def _hugging_face(path: Path) -> tuple[nn.Module, TokenizerSpec]:
    """A sequence classifier saved with ``save_pretrained`` plus the ``tokenizer.json`` saved beside it."""
    from transformers import AutoModelForSequenceClassification

    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SystemExit(f"{path} has no tokenizer.json: save the model's fast tokenizer into the same folder "
                         "(tokenizer.save_pretrained(folder))")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), attn_implementation="eager", local_files_only=True
        )
    except (ValueError, OSError) as exc:
        raise SystemExit(f"{path} is not a Hugging Face sequence classifier this transformers can load: {exc}") from exc
    config = model.config
    max_length = getattr(config, "max_position_embeddings", None)
    padding_idx = getattr(model.base_model.embeddings, "padding_idx", None)
    if max_length is not None and padding_idx is not None:
        max_length -= padding_idx + 1  # RoBERTa-style position ids start after the pad id
    pad_id = _pad_id(path, Tokenizer.from_file(str(tokenizer_file)), config.pad_token_id)
    return model, TokenizerSpec(tokenizer_file, pad_id, max_length)


def _torchvision(name: str) -> nn.Module:
    """An untrained torchvision architecture (weights come from ``--checkpoint``: nothing is downloaded)."""
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError) as exc:  # a build for another torch fails at import, not install
        raise SystemExit(f"--model torchvision:{name} needs torchvision built for the installed torch "
                         f"{torch.__version__} (see the compatibility table of pytorch/vision): {exc}") from exc
    try:
        return torchvision.models.get_model(name)
    except ValueError as exc:
        raise SystemExit(f"--model torchvision:{name}: {exc}") from exc


def load_model(source: str, checkpoint: Path | None = None) -> ModelSource:
    """Instantiate the model to prepare.

    Args:
        source: ``package.module:factory`` (any callable returning an ``nn.Module``), ``torchvision:<name>``, a
            Hugging Face folder with ``config.json`` and ``tokenizer.json`` (a sequence classifier), or an ``.onnx``
            file.
        checkpoint: optional safetensors state dict, loaded into the model as its source defines it (for
            torchvision and Hugging Face, the library's own module, before adapting it to the served tensors).
    """
    path = Path(source)
    tokenizer = None
    if source.endswith(".onnx"):
        from controller.prepare.onnx_import import load_onnx

        model = load_onnx(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _hugging_face(path)
    elif source.startswith("torchvision:"):
        model = _torchvision(source.split(":", 1)[1])
    else:
        module_name, _, attribute = source.partition(":")
        if not attribute:
            raise SystemExit(f"--model {source!r}: expected package.module:factory, torchvision:<name>, a Hugging "
                             "Face folder or an .onnx file")
        model = getattr(importlib.import_module(module_name), attribute)()
    if checkpoint is not None:
        model.load_state_dict(load_file(str(checkpoint)))
    if tokenizer is not None:
        model = LogitsOnly(model)
    elif source.startswith("torchvision:"):
        model = ImageNetPixels(model)
    return ModelSource(model.eval(), tokenizer)


def output_classes(model: nn.Module, example: dict[str, torch.Tensor]) -> int:
    """How many classes ``model`` predicts, checking on ``example`` that it takes these tensors and returns logits.

    Raises:
        SystemExit: when the model fails on the bootstrap tensors or does not return logits ``[B, C]``.
    """
    described = ", ".join(f"{name} {tuple(t.shape[1:])} {t.dtype}" for name, t in example.items())
    try:
        with torch.no_grad():
            logits = model(*example.values())
    except Exception as exc:  # whatever the model raises, it means these tensors do not fit it
        raise SystemExit(f"the model does not take the bootstrap tensors ({described}): {exc}") from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(next(iter(example.values()))):
        raise SystemExit(f"the model must return logits [batch, classes] for ({described}); got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    return int(logits.shape[1])
