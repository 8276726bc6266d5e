"""Triton Python model that tokenises raw UTF-8 text for an early-exit NLP model (first step of its pipeline).

The tokenizer is the model's own ``tokenizer.json`` in this entry's version folder (``prepare`` copies it there);
the sequence length is the output shape in the model config (served tensors have fixed shapes; longer text is
truncated) and the pad id is the config parameter ``pad_id``. Undecodable bytes, and texts longer than the
parameter ``max_text_bytes`` (default 64 KiB: tokenising a huge text costs time even though it is truncated), fail only
their own request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from triton_backend.raw_inputs import TEXT_INPUTS, TOKENIZER_FILE, TextEncoder


class TritonPythonModel:
    """``TEXT`` (BYTES ``[1]``) → ``INPUT_IDS``, ``ATTENTION_MASK`` (INT64 ``[T]``)."""

    def tokenizer_file(self, version_dir: Path) -> Path:
        """Where the tokenizer is: ``tokenizer.json`` in the version folder (an entry whose tokenizer ships with an
        installed package overrides this)."""
        return version_dir / TOKENIZER_FILE

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        output = next(o for o in config["output"] if o["name"] == TEXT_INPUTS[0])
        pad_id = int(config["parameters"]["pad_id"]["string_value"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.encoder = TextEncoder.from_file(self.tokenizer_file(version_dir), int(output["dims"][0]), pad_id)
        self.max_text_bytes = int(config["parameters"].get("max_text_bytes", {}).get("string_value") or 65536)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            raw = [bytes(item) for item in pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)]
            too_long = max((len(item) for item in raw), default=0)
            if too_long > self.max_text_bytes:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"TEXT of {too_long} bytes is longer than the {self.max_text_bytes} bytes accepted")))
                continue
            try:
                texts = [item.decode("utf-8") for item in raw]
            except UnicodeDecodeError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"TEXT is not UTF-8: {exc}")))
                continue
            tokens = self.encoder.encode(texts)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, tokens[n]) for n in TEXT_INPUTS])
            )
        return responses
