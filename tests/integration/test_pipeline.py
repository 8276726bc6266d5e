"""The ``_pipeline`` ensemble: encoded image bytes in, early answers out, bad bytes rejected per request."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image

from early_exit.runtime import EarlyExitModel
from tests.conftest import MODEL
from tests.integration.conftest import burst, publish
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


def _png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width and height, then its CRC over type + fields
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_bytes_in_a_batch_fail_alone_and_the_others_are_answered(stack: Stack, test_images: np.ndarray) -> None:
    """Garbage, empty, truncated and decompression-bomb images, each sent in the same burst as good JPEGs: only the
    bad ones fail, each with a clear reason; the good answers equal the direct model's."""
    good = [_jpeg(image) for image in test_images[:6]]
    bad = [b"definitely not an image", b"", good[0][: len(good[0]) // 2], _png_declaring(100_000, 100_000)]
    payloads = [item for pair in zip(good, [*bad, *bad]) for item in pair]
    results = burst(stack.grpc_url, f"{MODEL}_pipeline", [[_request([p])] for p in payloads])
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    for index, (payload, result) in enumerate(zip(payloads, results)):
        if index % 2:
            assert isinstance(result, grpcclient.InferenceServerException), f"bad payload {index} was answered"
            assert "image" in result.message()
            continue
        assert not isinstance(result, Exception), f"a good request failed beside a bad one: {result}"
        direct_input = grpcclient.InferInput("IMAGE", [1, *test_images.shape[1:]], "UINT8")
        direct_input.set_data_from_numpy(_decoded(payload))
        direct = client.infer(MODEL, [direct_input])
        assert result.as_numpy("LABEL")[0, 0] == direct.as_numpy("LABEL")[0, 0]


def test_requests_the_model_cannot_take_get_clear_errors_and_serving_goes_on(stack: Stack, test_images: np.ndarray):
    """Wrong dtype, wrong shape, a batch over the maximum and an empty batch are refused by Triton for that request
    only, with a message naming what is wrong."""
    def image_input(array: np.ndarray, dtype: str = "UINT8") -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("IMAGE", list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return [tensor]

    image = test_images[:1]
    max_batch = grpcclient.InferenceServerClient(stack.grpc_url).get_model_config(MODEL, as_json=True)[
        "config"]["max_batch_size"]
    cases = {
        "dtype": (image_input(image.astype(np.float32), "FP32"), "FP32"),
        "shape": (image_input(image[:, :-1]), "shape"),
        "batch": (image_input(np.repeat(image, max_batch + 1, axis=0)), "batch"),
    }
    requests = [image_input(image)]
    for inputs, _ in cases.values():
        requests += [inputs, image_input(image)]
    results = burst(stack.grpc_url, MODEL, requests)
    for index, result in enumerate(results):
        if index % 2:
            name, (_, expected) = list(cases.items())[index // 2]
            assert isinstance(result, grpcclient.InferenceServerException), f"{name} was accepted"
            assert expected.lower() in result.message().lower(), result.message()
        else:
            assert not isinstance(result, Exception), result
    empty = burst(stack.grpc_url, MODEL, [image_input(image[:0])])[0]
    assert isinstance(empty, grpcclient.InferenceServerException) or empty.as_numpy("LABEL").shape == (0, 1)
