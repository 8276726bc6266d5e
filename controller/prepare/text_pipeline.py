"""Write the raw-text front of a prepared text model: ``<name>_preprocess`` and the ``<name>_pipeline`` ensemble.

``<name>_preprocess`` runs ``triton_backend.preprocess_text`` with the model's own ``tokenizer.json`` copied into
its version folder, so the served tokenisation is the one the model (and its ramps) were trained with, and the entry
is self-contained. The ensemble takes ``TEXT`` (BYTES, UTF-8) and returns the early-exit entry's four outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from controller.prepare.sources import TokenizerSpec
from triton_backend.raw_inputs import TEXT_INPUTS, TOKENIZER_FILE

_SHIM = '''"""Triton entry point: tokenise raw text (see triton_backend.preprocess_text; written by prepare)."""

from triton_backend.preprocess_text import TritonPythonModel  # noqa: F401
'''


def _preprocess_config(name: str, max_length: int, pad_id: int, max_batch_size: int) -> str:
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_INT64 dims: [ {max_length} ] }}' for n in TEXT_INPUTS)
    return f"""name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
{outputs}
]
parameters [ {{ key: "pad_id" value: {{ string_value: "{pad_id}" }} }} ]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _ensemble_config(name: str, preprocess: str, model: str, classes: int, max_batch_size: int) -> str:
    tokens = ",\n".join(f'        {{ key: "{n}" value: "{n.lower()}" }}' for n in TEXT_INPUTS)
    results = ",\n".join(f'        {{ key: "{n}" value: "{n}" }}' for n in ("PROBS", "LABEL", "EXIT", "CONFIDENCE"))
    return f"""name: "{name}"
platform: "ensemble"
max_batch_size: {max_batch_size}
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "PROBS" data_type: TYPE_FP32 dims: [ {classes} ] }},
  {{ name: "LABEL" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "EXIT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "CONFIDENCE" data_type: TYPE_FP32 dims: [ 1 ] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{preprocess}"
      model_version: -1
      input_map {{ key: "TEXT" value: "TEXT" }}
      output_map [
{tokens}
      ]
    }},
    {{
      model_name: "{model}"
      model_version: -1
      input_map [
{tokens}
      ]
      output_map [
{results}
      ]
    }}
  ]
}}
"""


def write_text_pipeline(
    repository: Path, name: str, tokenizer: TokenizerSpec, max_length: int, classes: int, max_batch_size: int
) -> tuple[str, str]:
    """Write ``<name>_preprocess`` and ``<name>_pipeline`` next to the early-exit entry ``<name>``.

    Args:
        repository: the model repository holding ``<name>``.
        name: the early-exit entry, whose inputs are ``INPUT_IDS`` and ``ATTENTION_MASK`` ``[max_length]``.
        tokenizer: the model's tokenizer and pad id.
        max_length: tokens per text, as the entry was prepared with.
        classes: width of ``PROBS``.
        max_batch_size: as the entry's (an ensemble's steps must take its batches).

    Returns:
        The names of the two entries.
    """
    preprocess, pipeline = f"{name}_preprocess", f"{name}_pipeline"
    for entry in (preprocess, pipeline):
        if (repository / entry).exists():
            shutil.rmtree(repository / entry)
        (repository / entry / "1").mkdir(parents=True)
    shutil.copyfile(tokenizer.file, repository / preprocess / "1" / TOKENIZER_FILE)
    (repository / preprocess / "1" / "model.py").write_text(_SHIM, encoding="utf-8")
    (repository / preprocess / "config.pbtxt").write_text(
        _preprocess_config(preprocess, max_length, tokenizer.pad_id, max_batch_size), encoding="utf-8"
    )
    (repository / pipeline / "config.pbtxt").write_text(
        _ensemble_config(pipeline, preprocess, name, classes, max_batch_size), encoding="utf-8"
    )
    return preprocess, pipeline
