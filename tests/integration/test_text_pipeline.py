"""The NLP path end to end: raw UTF-8 text → tokeniser → MiniLM with ramps → early answer, on real servers."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, without_control_batches
from tests.integration.conftest import apply_config, batches_executed, burst
from workload.stack import Stack, running_stack

pytestmark = pytest.mark.integration
NAME = "sst2_minilm"
SENTENCES = ["a gripping , funny and moving film .", "dull , lifeless and far too long .", "not bad at all",
             "one of the year 's best", "an utter mess", "it 's fine"]


@pytest.fixture(scope="module")
def text_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """MiniLM with its real encoder weights and an untrained (seeded) head: ramps learn its predictions all the same."""
    from controller.prepare.__main__ import main as prepare

    repo = tmp_path_factory.mktemp("text_repository")
    assert prepare(["--model", "model_zoo.minilm_sst2:factory", "--name", NAME, "--data", "sst2", "--repository",
                    str(repo), "--limit", "300", "--ramp-epochs", "20"]) == 0  # max batch 32, as the pipeline
    without_control_batches(repo / NAME)
    for entry in ("text_preprocess", f"{NAME}_pipeline"):
        shutil.copytree(ROOT / "model_repository" / entry, repo / entry)
    models = [NAME, "text_preprocess", f"{NAME}_pipeline"]
    with running_stack(repo, models=models, with_controller=False, log_dir=tmp_path_factory.mktemp("logs")) as stack:
        yield stack


def _text(sentences: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("TEXT", [len(sentences), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=object).reshape(-1, 1))
    return tensor


def test_raw_text_gets_early_answers_through_the_pipeline(text_stack: Stack) -> None:
    client = grpcclient.InferenceServerClient(text_stack.grpc_url)
    apply_config(text_stack, NAME, 1, {3: 1.0})  # ramp 3 observes only
    final = [client.infer(f"{NAME}_pipeline", [_text([s])]) for s in SENTENCES]
    assert {int(r.as_numpy("EXIT")[0, 0]) for r in final} == {11}
    apply_config(text_stack, NAME, 2, {3: 0.0})  # threshold 0: every sample exits at ramp 3
    early = [client.infer(f"{NAME}_pipeline", [_text([s])]) for s in SENTENCES]
    assert {int(r.as_numpy("EXIT")[0, 0]) for r in early} == {3}
    assert all(r.as_numpy("PROBS").shape == (1, 2) for r in early)


def test_invalid_utf8_fails_only_its_request(text_stack: Stack) -> None:
    client = grpcclient.InferenceServerClient(text_stack.grpc_url)
    bad = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([b"\xff\xfe bad"], dtype=object).reshape(1, 1))
    with pytest.raises(grpcclient.InferenceServerException, match="not UTF-8"):
        client.infer(f"{NAME}_pipeline", [bad])
    assert client.infer(f"{NAME}_pipeline", [_text(["still serving"])]).as_numpy("LABEL").shape == (1, 1)


def _tokens(ids: np.ndarray) -> list[grpcclient.InferInput]:
    tensors = []
    for name, value in (("INPUT_IDS", ids), ("ATTENTION_MASK", np.ones_like(ids))):
        tensor = grpcclient.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def test_bad_requests_in_a_batch_fail_alone_and_the_others_are_answered(text_stack: Stack) -> None:
    """Token ids the embedding does not have (direct calls), invalid UTF-8 and oversized text (through the
    pipeline), each sent in the same burst as good requests: only the bad ones fail, each with its own reason."""
    client = grpcclient.InferenceServerClient(text_stack.grpc_url)
    length = client.get_model_metadata(NAME, as_json=True)["inputs"][0]["shape"][-1]
    good_ids = _tokens(np.full((1, int(length)), 1000, dtype=np.int64))
    bad_ids = _tokens(np.full((1, int(length)), 10**9, dtype=np.int64))
    before = batches_executed(text_stack.grpc_url, NAME)
    requests = [good_ids, bad_ids] * 4 + [good_ids] * 4
    results = burst(text_stack.grpc_url, NAME, requests)
    deadline = time.monotonic() + 10  # Triton counts a batch once execute returns, after its responses went out
    while (counts := np.subtract(batches_executed(text_stack.grpc_url, NAME), before))[0] < len(requests):
        assert time.monotonic() < deadline, f"Triton counted {counts[0]} of {len(requests)} inferences"
        time.sleep(0.05)
    inferences, executions = counts
    assert executions < inferences, "the burst was not batched: the test proves nothing"
    for index, result in enumerate(results):
        if index < 8 and index % 2:
            assert isinstance(result, grpcclient.InferenceServerException), "an impossible token id was answered"
        else:
            assert not isinstance(result, Exception), f"a good request failed beside a bad one: {result}"
            assert result.as_numpy("LABEL").shape == (1, 1)

    invalid = _raw_text([b"\xff\xfe bad"])
    oversized = _raw_text([b"word " * 100_000])
    results = burst(text_stack.grpc_url, f"{NAME}_pipeline", [[_text(["fine film"])], [invalid], [oversized]] * 3)
    for index, result in enumerate(results):
        if index % 3 == 0:
            assert not isinstance(result, Exception), f"a good request failed beside a bad one: {result}"
        else:
            assert isinstance(result, grpcclient.InferenceServerException)
            assert ("not UTF-8" if index % 3 == 1 else "bytes") in result.message()


def _raw_text(values: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("TEXT", [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
    return tensor
