"""Triton model configurations of the served entries, as the JSON documents Triton's model-control API takes.

One builder for both places a configuration comes from: ``prepare`` renders these documents to ``config.pbtxt``
(``controller.prepare.triton_config``), and an E3 router sends them to its server's model-control API when the
controller re-sizes its block models (``triton_backend.plan_follower``), so a reloaded block model is configured
exactly as a freshly prepared one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from early_exit.manifest import TensorSpec

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]
INSTANCE_KINDS: tuple[InstanceKind, ...] = ("KIND_CPU", "KIND_GPU")

TRITON_DTYPES = {
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float32": "TYPE_FP32",
    "bool": "TYPE_BOOL",
}

#: What every exit answers: ``PROBS`` ``[classes]``, ``LABEL``, ``EXIT`` (ramp id; the number of candidate ramps
#: means the final layer) and ``CONFIDENCE``, each ``[1]``.
VERDICT_TENSORS = {"PROBS": "TYPE_FP32", "LABEL": "TYPE_INT64", "EXIT": "TYPE_INT32", "CONFIDENCE": "TYPE_FP32"}


def vanilla_twin(name: str) -> str:
    """The entry that serves early-exit entry ``name``'s original model (one block, no ramps): written beside it by
    ``prepare`` and by the LLM entry writer, and the baseline every benchmark, demo and test compares against."""
    return f"{name}_vanilla"


def triton_dtype(spec: TensorSpec) -> str:
    try:
        return TRITON_DTYPES[spec.dtype]
    except KeyError:
        raise ValueError(f"{spec.name}: dtype {spec.dtype} has no Triton type here ({sorted(TRITON_DTYPES)})") from None


def tensor_config(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": triton_dtype(spec), "dims": list(spec.shape)}


def verdict_configs(classes: int, names: Sequence[str] = tuple(VERDICT_TENSORS)) -> list[dict[str, Any]]:
    return [{"name": name, "data_type": VERDICT_TENSORS[name], "dims": [classes if name == "PROBS" else 1]}
            for name in names]


def model_config(
    name: str,
    backend: str,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[dict[str, Any]],
    max_queue_delay_us: int,
    count: int,
    instance_kind: InstanceKind,
    parameters: Mapping[str, str],
    preferred_batch_sizes: Sequence[int] = (),
) -> dict[str, Any]:
    """A batched Python-backend model: dynamic batching (dispatching at once when the queue holds one of
    ``preferred_batch_sizes``, else after ``max_queue_delay_us``), ``count`` instances of ``instance_kind``, string
    parameters."""
    batching: dict[str, Any] = {"max_queue_delay_microseconds": max_queue_delay_us}
    if preferred_batch_sizes:
        batching = {"preferred_batch_size": list(preferred_batch_sizes), **batching}
    return {
        "name": name,
        "backend": backend,
        "max_batch_size": max_batch_size,
        "input": [tensor_config(spec) for spec in inputs],
        "output": list(outputs),
        "dynamic_batching": batching,
        "instance_group": [{"count": count, "kind": instance_kind}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }
