"""Render the ``config.pbtxt`` of an early-exit model-repository entry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from early_exit.manifest import TensorSpec

BACKEND = "apparate"
ROUTER_BACKEND = "apparate_e3"
BLOCK_BACKEND = "apparate_e3_block"

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]

#: How long a served entry's batcher holds a request while its instance is idle, hoping for company. Triton's dynamic
#: batcher is work-conserving without it: requests that arrive while the instance is busy form the next batch, so
#: batches still grow with load and capacity does not depend on the delay. A delay only adds its full length to every
#: request that finds the instance idle, which is most of them at moderate load (measured on a 2-core CPU: a
#: ResNet-56 request 7.5 ms with 2 ms, 5.4 ms with 0). Raise it in the config where batching pays more, on a GPU.
QUEUE_DELAY_US = 0

TRITON_DTYPES = {
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float32": "TYPE_FP32",
    "bool": "TYPE_BOOL",
}


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def _triton_dtype(spec: TensorSpec) -> str:
    try:
        return TRITON_DTYPES[spec.dtype]
    except KeyError:
        raise ValueError(f"{spec.name}: dtype {spec.dtype} has no Triton type here ({sorted(TRITON_DTYPES)})") from None


def _parameters(parameters: Mapping[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
                   for key, value in parameters.items())


def _preferred(batch_size: int | None) -> str:
    return f"  preferred_batch_size: [ {batch_size} ]\n" if batch_size else ""


VERDICT_TENSORS = {"PROBS": "TYPE_FP32", "LABEL": "TYPE_INT64", "EXIT": "TYPE_INT32", "CONFIDENCE": "TYPE_FP32"}


def render_config(
    name: str,
    inputs: Sequence[TensorSpec],
    classes: int,
    max_batch_size: int,
    max_queue_delay_us: int = QUEUE_DELAY_US,
    instance_kind: InstanceKind = "KIND_CPU",
    backend: str = BACKEND,
    parameters: Mapping[str, str] | None = None,
    preferred_batch_size: int | None = None,
) -> str:
    """A non-decoupled entry with dynamic batching: early answers go out through each request's response sender.

    ``instance_kind`` is the ``instance_group`` kind; with ``KIND_GPU`` Triton gives each instance a GPU and the
    backend runs the blocks and ramps on it. The E3 router (``backend`` ``apparate_e3``) takes and answers the same
    tensors, so clients cannot tell the modes apart.

    Outputs: ``PROBS`` ``[classes]``, ``LABEL`` ``[1]``, ``EXIT`` ``[1]`` (ramp id; the number of candidate ramps
    means the final layer) and ``CONFIDENCE`` ``[1]``.
    """
    verdict = [_tensor(n, dtype, [classes if n == "PROBS" else 1]) for n, dtype in VERDICT_TENSORS.items()]
    return _entry(name, backend, max_batch_size, inputs, verdict, preferred_batch_size, max_queue_delay_us, 1,
                  instance_kind, parameters or {})


def render_block_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    classes: int,
    max_batch_size: int,
    max_queue_delay_us: int,
    replicas: int,
    parameters: Mapping[str, str],
    instance_kind: InstanceKind = "KIND_CPU",
) -> str:
    """An E3 block model: a plain batched model whose batcher waits up to ``max_queue_delay_us`` to gather up to
    ``max_batch_size`` survivors, replicated ``replicas`` times. No preferred size: requests are the survivors of
    upstream batches, whole and of any size, and a preferred size would dispatch one alone rather than exceed it. Tensor names are the caller's (see
    ``early_exit.e3_plan.tensor_name``); it also returns its exit's verdict (``PROBS``, ``CONFIDENCE``, ``LABEL``)."""
    verdict = [_tensor(n, dtype, [classes if n == "PROBS" else 1]) for n, dtype in VERDICT_TENSORS.items() if n != "EXIT"]
    carried = [_tensor(t.name, _triton_dtype(t), t.shape) for t in outputs]
    return _entry(name, BLOCK_BACKEND, max_batch_size, inputs, [*carried, *verdict], None,
                  max_queue_delay_us, replicas, instance_kind, parameters)


def _entry(name: str, backend: str, max_batch_size: int, inputs: Sequence[TensorSpec], output_lines: list[str],
           preferred_batch_size: int | None, max_queue_delay_us: int, count: int, instance_kind: InstanceKind,
           parameters: Mapping[str, str]) -> str:
    input_lines = ",\n".join(_tensor(t.name, _triton_dtype(t), t.shape) for t in inputs)
    outputs = ",\n".join(output_lines)
    return f"""name: "{name}"
backend: "{backend}"
max_batch_size: {max_batch_size}
input [
{input_lines}
]
output [
{outputs}
]
dynamic_batching {{
{_preferred(preferred_batch_size)}  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [ {{ count: {count} kind: {instance_kind} }} ]
{_parameters(parameters)}"""
