"""The ``_pipeline`` ensemble: encoded image bytes in, early answers out, bad bytes rejected per request."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from tests.conftest import MODEL
from tests.integration.conftest import publish
from workload.metrics import metric
from workload.stack import Stack

pytestmark = pytest.mark.integration


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _request(data: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("IMAGE_BYTES", [len(data), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=object).reshape(-1, 1))
    return tensor


def test_pipeline_answers_raw_jpeg_bytes_with_early_exits(stack: Stack, test_images: np.ndarray) -> None:
    config = publish(stack, {2: 0.6, 5: 0.8})
    deadline = time.monotonic() + 5
    while metric(stack.metrics_url, "apparate_config_version", model=MODEL) != config.version:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    exits, agree = [], []
    for image in test_images[:40]:
        data = _jpeg(image)
        through_pipeline = client.infer(f"{MODEL}_pipeline", [_request([data])])
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
        direct_input = grpcclient.InferInput("IMAGE", list(decoded.shape), "UINT8")
        direct_input.set_data_from_numpy(decoded)
        direct = client.infer(MODEL, [direct_input])
        exits.append(int(through_pipeline.as_numpy("EXIT")[0, 0]))
        agree.append(through_pipeline.as_numpy("LABEL")[0, 0] == direct.as_numpy("LABEL")[0, 0])
        np.testing.assert_allclose(through_pipeline.as_numpy("PROBS"), direct.as_numpy("PROBS"), atol=1e-6)
    assert all(agree)
    assert any(e in (2, 5) for e in exits), f"no early exit through the pipeline: {exits}"


def test_pipeline_rejects_undecodable_bytes_without_hurting_other_requests(stack: Stack, test_images: np.ndarray):
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    with pytest.raises(grpcclient.InferenceServerException, match="not a decodable image"):
        client.infer(f"{MODEL}_pipeline", [_request([b"definitely not an image"])])
    ok = client.infer(f"{MODEL}_pipeline", [_request([_jpeg(test_images[0])])])
    assert ok.as_numpy("LABEL").shape == (1, 1)
