"""The ``_pipeline`` ensemble: encoded image bytes in, early answers out, bad bytes rejected per request."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image

from early_exit.runtime import EarlyExitModel
from tests.conftest import MODEL
from tests.integration.conftest import publish
from workload.metrics import metric
from workload.stack import Stack

pytestmark = pytest.mark.integration
EARLY_RAMP = 2


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _request(data: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("IMAGE_BYTES", [len(data), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=object).reshape(-1, 1))
    return tensor


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]


def test_pipeline_answers_raw_jpeg_bytes_with_early_exits(
    stack: Stack, repository: Path, test_images: np.ndarray
) -> None:
    encoded = [_jpeg(image) for image in test_images[:40]]
    model = EarlyExitModel(repository / MODEL / "1")
    with torch.inference_mode():
        batch = torch.from_numpy(np.concatenate([_decoded(data) for data in encoded]))
        confidence = next(model.stages({"IMAGE": batch}, [EARLY_RAMP])).confidence
    config = publish(stack, {EARLY_RAMP: float(np.median(confidence))})  # about half exit at the early ramp
    deadline = time.monotonic() + 5
    while metric(stack.metrics_url, "apparate_config_version", model=MODEL) != config.version:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    exits, agree = [], []
    for data in encoded:
        through_pipeline = client.infer(f"{MODEL}_pipeline", [_request([data])])
        decoded = _decoded(data)
        direct_input = grpcclient.InferInput("IMAGE", list(decoded.shape), "UINT8")
        direct_input.set_data_from_numpy(decoded)
        direct = client.infer(MODEL, [direct_input])
        exits.append(int(through_pipeline.as_numpy("EXIT")[0, 0]))
        agree.append(through_pipeline.as_numpy("LABEL")[0, 0] == direct.as_numpy("LABEL")[0, 0])
        np.testing.assert_allclose(through_pipeline.as_numpy("PROBS"), direct.as_numpy("PROBS"), atol=1e-6)
    assert all(agree)
    assert EARLY_RAMP in exits, f"no early exit through the pipeline: {exits}"


def test_pipeline_rejects_undecodable_bytes_without_hurting_other_requests(stack: Stack, test_images: np.ndarray):
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    with pytest.raises(grpcclient.InferenceServerException, match="not a decodable image"):
        client.infer(f"{MODEL}_pipeline", [_request([b"definitely not an image"])])
    ok = client.infer(f"{MODEL}_pipeline", [_request([_jpeg(test_images[0])])])
    assert ok.as_numpy("LABEL").shape == (1, 1)
