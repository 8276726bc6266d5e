"""Serve your own model: a Hugging Face classifier with its own tokenizer, prepared from a text file of inputs,
answers raw text through the ``<name>_pipeline`` ensemble that ``prepare`` wrote, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from controller.prepare.sources import load_model
from tests.conftest import without_control_batches
from tests.integration.conftest import apply_config
from tests.unit.test_sources import LABELS, WORDS, save_tiny_classifier
from workload.stack import Stack, running_stack

pytestmark = pytest.mark.integration
NAME = "own_bert"
SENTENCES = ["a very good film", "the plot is not fine", "dull", "great great great"]
CUT_POINTS = 3  # 2 encoder layers: after attention and feed-forward of each, the last dropped


@pytest.fixture(scope="module")
def own_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("own_bert"), "bert")


@pytest.fixture(scope="module")
def own_stack(own_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from controller.prepare.__main__ import main as prepare

    inputs = tmp_path_factory.mktemp("inputs") / "inputs.txt"
    rng = np.random.default_rng(0)
    inputs.write_text("\n".join(" ".join(rng.choice(WORDS, 5)) for _ in range(200)), encoding="utf-8")
    repo = tmp_path_factory.mktemp("own_repository")
    assert prepare(["--model", str(own_model), "--name", NAME, "--data", str(inputs), "--max-length", "16",
                    "--repository", str(repo), "--limit", "80", "--ramp-epochs", "3", "--max-batch-size", "8"]) == 0
    without_control_batches(repo / NAME)
    models = [NAME, f"{NAME}_preprocess", f"{NAME}_pipeline"]
    with running_stack(repo, models=models, with_controller=False, log_dir=tmp_path_factory.mktemp("logs")) as stack:
        yield stack


def _infer(client: grpcclient.InferenceServerClient, sentence: str) -> grpcclient.InferResult:
    text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([sentence.encode()], dtype=object).reshape(1, 1))
    return client.infer(f"{NAME}_pipeline", [text])


def test_pipeline_answers_raw_text_like_the_original_model(own_stack: Stack, own_model: Path) -> None:
    source = load_model(str(own_model))
    assert source.tokenizer is not None
    tokens = source.tokenizer.encoder(16).encode(SENTENCES)
    with torch.no_grad():
        expected = source.module(*(torch.from_numpy(tokens[n]) for n in tokens)).softmax(1).numpy()
    client = grpcclient.InferenceServerClient(own_stack.grpc_url)

    apply_config(own_stack, NAME, 1, {0: 1.0})  # ramp 0 observes only: every answer comes from the final layer
    final = [_infer(client, s) for s in SENTENCES]
    assert [int(r.as_numpy("EXIT")[0, 0]) for r in final] == [CUT_POINTS] * len(SENTENCES)
    np.testing.assert_allclose(np.concatenate([r.as_numpy("PROBS") for r in final]), expected, atol=1e-5)
    assert [int(r.as_numpy("LABEL")[0, 0]) for r in final] == expected.argmax(1).tolist()

    apply_config(own_stack, NAME, 2, {0: 0.0})  # threshold 0: every sample exits at ramp 0
    early = [_infer(client, s) for s in SENTENCES]
    assert {int(r.as_numpy("EXIT")[0, 0]) for r in early} == {0}
    assert all(r.as_numpy("PROBS").shape == (1, LABELS) for r in early)
