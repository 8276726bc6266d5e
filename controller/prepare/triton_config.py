"""Render the ``config.pbtxt`` of an early-exit model-repository entry."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from early_exit.manifest import TensorSpec
from early_exit.model_config import InstanceKind, model_config, verdict_configs

BACKEND = "apparate"
ROUTER_BACKEND = "apparate_e3"

#: How long a served entry's batcher holds a request while its instance is idle, hoping for company. Triton's dynamic
#: batcher is work-conserving without it: requests that arrive while the instance is busy form the next batch, so
#: batches still grow with load and capacity does not depend on the delay. A delay only adds its full length to every
#: request that finds the instance idle, which is most of them at moderate load (measured on a 2-core CPU: a
#: ResNet-56 request 7.5 ms with 2 ms, 5.4 ms with 0). Raise it in the config where batching pays more, on a GPU.
QUEUE_DELAY_US = 0


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
    instances: int = 1,
) -> str:
    """A non-decoupled entry with dynamic batching: early answers go out through each request's response sender.

    ``instance_kind`` is the ``instance_group`` kind; with ``KIND_GPU`` Triton gives each instance a GPU and the
    backend runs the blocks and ramps on it. The E3 router (``backend`` ``apparate_e3``) takes and answers the same
    tensors, so clients cannot tell the modes apart. Outputs: ``early_exit.model_config.VERDICT_TENSORS``.
    ``instances``: the ``instance_group`` count.
    """
    return render_pbtxt(model_config(name, backend, max_batch_size, inputs, verdict_configs(classes),
                                     max_queue_delay_us, instances, instance_kind, parameters or {},
                                     (preferred_batch_size,) if preferred_batch_size else ()))


#: Fields whose values are protobuf enum names, written bare.
_ENUM_FIELDS = frozenset({"data_type", "kind"})


def render_pbtxt(config: Mapping[str, Any]) -> str:
    """``config.pbtxt`` text of a model configuration in Triton's JSON form (``early_exit.model_config``)."""
    return "".join(_field(key, value, "") for key, value in config.items())


def _field(key: str, value: Any, indent: str) -> str:
    if key == "parameters":  # a protobuf map: one entry per key
        return "".join(f'{indent}parameters: {{ key: {json.dumps(k)} value: {{ string_value: '
                       f'{json.dumps(v["string_value"])} }} }}\n' for k, v in value.items())
    if isinstance(value, Mapping):
        inner = "".join(_field(k, v, indent + "  ") for k, v in value.items())
        return f"{indent}{key} {{\n{inner}{indent}}}\n"
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        items = ",\n".join(f"{indent}  {{ {_inline(item)} }}" for item in value)
        return f"{indent}{key} [\n{items}\n{indent}]\n"
    return f"{indent}{key}: {_scalar(key, value)}\n"


def _inline(message: Mapping[str, Any]) -> str:
    return " ".join(f"{k}: {_scalar(k, v)}" for k, v in message.items())


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"[ {', '.join(_scalar(key, v) for v in value)} ]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) or key in _ENUM_FIELDS:
        return str(value)
    return json.dumps(value)
