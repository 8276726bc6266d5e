"""Triton Python model that turns encoded images (JPEG, PNG, …) into the ``IMAGE`` tensor of an early-exit model.

It is the first step of the ``<name>_pipeline`` ensembles, so a client sends the bytes it has. A request with bytes
that do not decode gets its own error response; the other requests of the batch are unaffected.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_backend.raw_inputs import decode_image


class TritonPythonModel:
    """``IMAGE_BYTES`` (BYTES ``[1]``) → ``IMAGE`` (UINT8 ``[H, W, 3]``), shape taken from the model config."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        output = next(o for o in config["output"] if o["name"] == "IMAGE")
        self.height, self.width = int(output["dims"][0]), int(output["dims"][1])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE_BYTES").as_numpy().reshape(-1)
            try:
                images = np.stack([decode_image(bytes(item), self.height, self.width) for item in encoded])
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", images)]))
        return responses
