"""Triton Python model that tokenises raw UTF-8 text for an early-exit NLP model (first step of its pipeline).

Output shapes come from the model config (fixed sequence length: the served tensors have fixed shapes); text longer
than that is truncated. Undecodable bytes fail only their own request.
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils

from model_zoo.minilm_sst2 import tokenize


class TritonPythonModel:
    """``TEXT`` (BYTES ``[1]``) → ``INPUT_IDS``, ``ATTENTION_MASK`` (INT64 ``[T]``)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        output = next(o for o in config["output"] if o["name"] == "INPUT_IDS")
        self.length = int(output["dims"][0])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                sentences = [bytes(item).decode("utf-8") for item in raw]
            except UnicodeDecodeError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"TEXT is not UTF-8: {exc}")))
                continue
            tokens = tokenize(sentences, max_length=self.length)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("INPUT_IDS", tokens["input_ids"]),
                        pb_utils.Tensor("ATTENTION_MASK", tokens["attention_mask"]),
                    ]
                )
            )
        return responses
