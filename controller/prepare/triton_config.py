"""Render the ``config.pbtxt`` of an early-exit model-repository entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from early_exit.manifest import TensorSpec

BACKEND = "apparate"

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]

TRITON_DTYPES = {
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float32": "TYPE_FP32",
    "bool": "TYPE_BOOL",
}


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def render_config(
    name: str,
    inputs: Sequence[TensorSpec],
    classes: int,
    max_batch_size: int,
    max_queue_delay_us: int = 2000,
    instance_kind: InstanceKind = "KIND_CPU",
) -> str:
    """A non-decoupled entry with dynamic batching: early answers go out through each request's response sender.

    ``instance_kind`` is the ``instance_group`` kind; with ``KIND_GPU`` Triton gives each instance a GPU and the
    backend runs the blocks and ramps on it.

    Outputs: ``PROBS`` ``[classes]``, ``LABEL`` ``[1]``, ``EXIT`` ``[1]`` (ramp id; the number of candidate ramps
    means the final layer) and ``CONFIDENCE`` ``[1]``.
    """
    input_lines = ",\n".join(_tensor(t.name, TRITON_DTYPES[t.dtype], t.shape) for t in inputs)
    output_lines = ",\n".join(
        [
            _tensor("PROBS", "TYPE_FP32", [classes]),
            _tensor("LABEL", "TYPE_INT64", [1]),
            _tensor("EXIT", "TYPE_INT32", [1]),
            _tensor("CONFIDENCE", "TYPE_FP32", [1]),
        ]
    )
    return f"""name: "{name}"
backend: "{BACKEND}"
max_batch_size: {max_batch_size}
input [
{input_lines}
]
output [
{output_lines}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [ {{ count: 1 kind: {instance_kind} }} ]
"""
