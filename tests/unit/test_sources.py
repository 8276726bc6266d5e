"""Model sources: Hugging Face folders with their own tokenizer (BERT, DistilBERT, RoBERTa), torchvision, adapters."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from controller.prepare.__main__ import main as prepare
from controller.prepare.cutpoints import find_cut_points
from controller.prepare.pipeline import trace
from controller.prepare.sources import ImageNetPixels, forward_inputs, load_model, output_classes
from early_exit.manifest import Manifest
from model_zoo.vision import IMAGENET_MEAN, IMAGENET_STD

WORDS = ("good", "bad", "great", "awful", "film", "plot", "not", "very", "a", "the", "fine", "dull")
# (model type, special tokens in id order, pad token): BERT and DistilBERT pad with id 0, RoBERTa with id 1.
FAMILIES = {
    "bert": (("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[PAD]", "[CLS]", "[SEP]"),
    "distilbert": (("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[PAD]", "[CLS]", "[SEP]"),
    "roberta": (("<s>", "<pad>", "</s>", "<unk>"), "<pad>", "<s>", "</s>"),
}
LABELS = 3


def word_tokenizer(family: str) -> Tokenizer:
    """A WordLevel tokenizer over ``WORDS`` that wraps each text in the family's start/end tokens."""
    specials, _, start, end = FAMILIES[family]
    vocab = {token: i for i, token in enumerate((*specials, *WORDS))}
    unknown = next(t for t in specials if "unk" in t.lower())
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, vocab[start]), (end, vocab[end])]
    )
    return tokenizer


def save_tiny_classifier(folder: Path, family: str, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, hidden-32, 3-label sequence classifier and its tokenizer.json in ``folder``."""
    from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig

    specials, pad, _, _ = FAMILIES[family]
    common = {"vocab_size": len(specials) + len(WORDS), "num_labels": LABELS, "pad_token_id": specials.index(pad),
              "max_position_embeddings": 80}
    config = {
        "bert": lambda: BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   **common),
        "distilbert": lambda: DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common),
        "roberta": lambda: RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, **common),
    }[family]()
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    word_tokenizer(family).save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hugging_face_folder_brings_its_tokenizer_and_cuts_per_sublayer(tmp_path: Path, family: str) -> None:
    source = load_model(str(save_tiny_classifier(tmp_path, family)))
    specials, pad, _, _ = FAMILIES[family]
    assert source.tokenizer is not None
    assert source.tokenizer.pad_id == specials.index(pad)
    # RoBERTa's position ids start after the pad id, so two of its 80 positions are not usable.
    assert source.tokenizer.max_length == (80 - 2 if family == "roberta" else 80)
    assert forward_inputs(source.module) == ["input_ids", "attention_mask"]

    tokens = source.tokenizer.encoder(12).encode(["a very good film", "not good", "the plot is dull", "fine"] * 2)
    example = {name: torch.from_numpy(array[:7]) for name, array in tokens.items()}
    assert (tokens["INPUT_IDS"][3, 3:] == specials.index(pad)).all()  # "<start> fine <end>" then padding
    assert output_classes(source.module, example) == LABELS
    cuts = find_cut_points(trace(source.module, example).graph, 0)
    assert len(cuts) == 3  # after attention and feed-forward of each of the 2 layers, the last one dropped


def test_prepare_writes_a_text_pipeline_for_a_hugging_face_folder(tmp_path: Path) -> None:
    model = save_tiny_classifier(tmp_path / "model", "roberta")
    texts = tmp_path / "inputs.txt"
    rng = np.random.default_rng(0)
    texts.write_text("\n".join(" ".join(rng.choice(WORDS, 4)) for _ in range(60)), encoding="utf-8")
    repository = tmp_path / "repository"

    assert prepare(["--model", str(model), "--name", "tiny", "--data", str(texts), "--max-length", "16",
                    "--repository", str(repository), "--ramp-epochs", "2", "--max-batch-size", "4"]) == 0

    manifest = Manifest.from_json((repository / "tiny" / "1" / "manifest.json").read_text())
    assert [(t.name, t.shape) for t in manifest.inputs] == [("INPUT_IDS", (16,)), ("ATTENTION_MASK", (16,))]
    assert manifest.classes == LABELS
    preprocess = (repository / "tiny_preprocess" / "config.pbtxt").read_text()
    assert 'key: "pad_id" value: { string_value: "1" }' in preprocess
    assert "dims: [ 16 ]" in preprocess and "max_batch_size: 4" in preprocess
    copied = json.loads((repository / "tiny_preprocess" / "1" / "tokenizer.json").read_text())
    assert copied == json.loads((model / "tokenizer.json").read_text())
    ensemble = (repository / "tiny_pipeline" / "config.pbtxt").read_text()
    assert 'model_name: "tiny_preprocess"' in ensemble and 'model_name: "tiny"' in ensemble
    assert f"dims: [ {LABELS} ]" in ensemble


def test_folder_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    folder = save_tiny_classifier(tmp_path, "bert")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        load_model(str(folder))


def test_tokenizer_and_config_must_agree_on_the_pad_id(tmp_path: Path) -> None:
    folder = save_tiny_classifier(tmp_path, "roberta")
    tokenizer = word_tokenizer("roberta")
    tokenizer.enable_padding(pad_id=0, pad_token="<s>")  # the config says 1
    tokenizer.save(str(folder / "tokenizer.json"))
    with pytest.raises(SystemExit, match="pad id"):
        load_model(str(folder))


def test_sequence_longer_than_the_position_embeddings_is_refused(tmp_path: Path) -> None:
    source = load_model(str(save_tiny_classifier(tmp_path, "roberta")))
    assert source.tokenizer is not None
    with pytest.raises(SystemExit, match="at most 78 tokens"):
        source.tokenizer.encoder(80)


def test_checkpoint_loads_into_the_hugging_face_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = load_model(str(save_tiny_classifier(tmp_path / "other", "bert", seed=1))).module
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    loaded = load_model(str(save_tiny_classifier(tmp_path / "base", "bert")), tmp_path / "weights.safetensors")
    ids = torch.tensor([[2, 8, 9, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(ids, mask), other(ids, mask))


def test_model_that_does_not_take_the_tensors_is_refused_with_their_description() -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(SystemExit, match=r"IMAGE \(8, 8, 3\) torch.uint8"):
        output_classes(model, {"IMAGE": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)})
    with pytest.raises(SystemExit, match=r"logits \[batch, classes\]"):
        output_classes(torch.nn.Identity(), {"X": torch.zeros(2, 4, 5)})


def test_imagenet_pixels_adapter_normalises_uint8_hwc() -> None:
    model = ImageNetPixels(torch.nn.Flatten())
    image = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    expected = (image.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(model(image), expected.flatten(1))
    assert forward_inputs(model) == ["image"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_without_torchvision_says_what_to_install() -> None:
    with pytest.raises(SystemExit, match=re.escape(f"torchvision built for the installed torch {torch.__version__}")):
        load_model("torchvision:resnet18")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_model_takes_served_pixels() -> None:
    source = load_model("torchvision:resnet18")
    assert output_classes(source.module, {"IMAGE": torch.zeros(2, 64, 64, 3, dtype=torch.uint8)}) == 1000
    with pytest.raises(SystemExit, match="torchvision:no_such_net"):
        load_model("torchvision:no_such_net")
