"""Write the raw-input front of a prepared entry: ``<name>_preprocess`` and the ``<name>_pipeline`` ensemble.

Clients have text and encoded images, not token ids and pixel tensors. ``<name>_preprocess`` turns one into the
other with the same code the bootstrap used (``triton_backend.raw_inputs``), and ``<name>_pipeline`` chains it with
the early-exit entry ``<name>``, returning that entry's four outputs. For a text model the preprocessing entry holds a
copy of the model's own ``tokenizer.json`` (so the served tokenisation is the one the ramps were trained with, and
the entry is self-contained); for an image model its output shape is the entry's input shape, from which
``triton_backend.preprocess_image`` reads the size to resize to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from controller.prepare.sources import TokenizerSpec
from controller.prepare.triton_config import QUEUE_DELAY_US
from early_exit.manifest import TensorSpec
from triton_backend.raw_inputs import IMAGE_INPUT, TEXT_INPUTS, TOKENIZER_FILE

_SHIM = '''"""Triton entry point (written by prepare): see triton_backend.{module}."""

from triton_backend.{module} import TritonPythonModel  # noqa: F401
'''
_OUTPUTS = ("PROBS", "LABEL", "EXIT", "CONFIDENCE")


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in shape)


def _preprocess_config(name: str, raw: str, outputs: list[tuple[str, str, tuple[int, ...]]], max_batch_size: int,
                       parameters: dict[str, str]) -> str:
    output_lines = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {_dims(s)} ] }}' for n, t, s in outputs)
    parameter_lines = "".join(f'parameters [ {{ key: "{k}" value: {{ string_value: "{v}" }} }} ]\n'
                              for k, v in parameters.items())
    return f"""name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "{raw}" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
{output_lines}
]
{parameter_lines}dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _ensemble_config(name: str, preprocess: str, model: str, raw: str, tensors: tuple[str, ...], classes: int,
                     max_batch_size: int) -> str:
    handed_over = ",\n".join(f'        {{ key: "{n}" value: "{n.lower()}" }}' for n in tensors)
    results = ",\n".join(f'        {{ key: "{n}" value: "{n}" }}' for n in _OUTPUTS)
    return f"""name: "{name}"
platform: "ensemble"
max_batch_size: {max_batch_size}
input [ {{ name: "{raw}" data_type: TYPE_STRING dims: [ 1 ] }} ]
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
      input_map {{ key: "{raw}" value: "{raw}" }}
      output_map [
{handed_over}
      ]
    }},
    {{
      model_name: "{model}"
      model_version: -1
      input_map [
{handed_over}
      ]
      output_map [
{results}
      ]
    }}
  ]
}}
"""


def _entries(repository: Path, name: str) -> tuple[str, str]:
    """The two entries' names, their version folders created. Files are overwritten in place rather than the folders
    recreated, so a committed entry (the references') stays byte-identical, version-folder placeholder included."""
    preprocess, pipeline = f"{name}_preprocess", f"{name}_pipeline"
    for entry in (preprocess, pipeline):
        (repository / entry / "1").mkdir(parents=True, exist_ok=True)
    return preprocess, pipeline


def write_text_pipeline(
    repository: Path, name: str, tokenizer: TokenizerSpec, max_length: int, classes: int, max_batch_size: int
) -> tuple[str, str]:
    """Write ``<name>_preprocess`` (``TEXT`` → token ids) and ``<name>_pipeline`` next to the early-exit entry.

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
    preprocess, pipeline = _entries(repository, name)
    shutil.copyfile(tokenizer.file, repository / preprocess / "1" / TOKENIZER_FILE)
    (repository / preprocess / "1" / "model.py").write_text(_SHIM.format(module="preprocess_text"), encoding="utf-8")
    outputs = [(n, "TYPE_INT64", (max_length,)) for n in TEXT_INPUTS]
    (repository / preprocess / "config.pbtxt").write_text(
        _preprocess_config(preprocess, "TEXT", outputs, max_batch_size, {"pad_id": str(tokenizer.pad_id)}),
        encoding="utf-8",
    )
    (repository / pipeline / "config.pbtxt").write_text(
        _ensemble_config(pipeline, preprocess, name, "TEXT", TEXT_INPUTS, classes, max_batch_size), encoding="utf-8"
    )
    return preprocess, pipeline


def servable_image(inputs: tuple[TensorSpec, ...]) -> TensorSpec | None:
    """The entry's image input when encoded images can feed it: a single uint8 ``IMAGE`` ``[H, W, 3]``."""
    if len(inputs) != 1:
        return None
    spec = inputs[0]
    return spec if spec.name == IMAGE_INPUT and spec.dtype == "uint8" and len(spec.shape) == 3 and spec.shape[2] == 3 \
        else None


def write_image_pipeline(repository: Path, name: str, image: TensorSpec, classes: int,
                         max_batch_size: int) -> tuple[str, str]:
    """Write ``<name>_preprocess`` (``IMAGE_BYTES`` → ``IMAGE``) and ``<name>_pipeline`` next to the entry.

    Args:
        repository: the model repository holding ``<name>``.
        name: the early-exit entry.
        image: its input, as :func:`servable_image` accepts it; encoded images are decoded and resized to its shape.
        classes: width of ``PROBS``.
        max_batch_size: as the entry's.

    Returns:
        The names of the two entries.
    """
    preprocess, pipeline = _entries(repository, name)
    (repository / preprocess / "1" / TOKENIZER_FILE).unlink(missing_ok=True)  # left by an earlier text entry
    (repository / preprocess / "1" / "model.py").write_text(_SHIM.format(module="preprocess_image"), encoding="utf-8")
    (repository / preprocess / "config.pbtxt").write_text(
        _preprocess_config(preprocess, "IMAGE_BYTES", [(IMAGE_INPUT, "TYPE_UINT8", image.shape)], max_batch_size, {}),
        encoding="utf-8",
    )
    (repository / pipeline / "config.pbtxt").write_text(
        _ensemble_config(pipeline, preprocess, name, "IMAGE_BYTES", (IMAGE_INPUT,), classes, max_batch_size),
        encoding="utf-8",
    )
    return preprocess, pipeline
