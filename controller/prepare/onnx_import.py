"""Run an ONNX graph as a PyTorch module, so ``torch.export`` can trace it and ``prepare`` can cut it.

A small interpreter over the ONNX operators that classifiers exported from PyTorch use: CNNs (convolution, batch
norm, pooling, GEMM) and vision transformers (layer norm, matmul, softmax, erf-based GELU, the shape arithmetic of
reshapes and of the class token's expand).

Values live in two domains. Tensors are computed at run time. *Shape values* (0-d and 1-d integers: ``Shape``
outputs, integer constants, and arithmetic on them) stay Python ints and ``torch.SymInt``s, never tensors, so the
batch dimension stays symbolic when ``torch.export`` traces the module and the exported graph keeps a dynamic batch.
Float initializers and constants become buffers (0-d ones Python floats), so ``.to(device)`` moves every tensor the
graph reads. An operator outside the set fails at construction time with its name, not halfway through a trace.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from early_exit.errors import ArtifactError

_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.UINT8: torch.uint8,
           onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.BOOL: torch.bool}

Size = int | torch.SymInt
ShapeValue = Size | tuple[Size, ...]
Op = Callable[[list[Any], dict[str, Any]], Any]


def _is_shape_value(value: object) -> bool:
    return isinstance(value, (int, torch.SymInt, tuple))


def _sizes(value: ShapeValue) -> tuple[Size, ...]:
    return value if isinstance(value, tuple) else (value,)


def _shape_elementwise(fn: Callable[..., Any], *operands: ShapeValue) -> ShapeValue:
    """``fn`` applied element by element to shape values, broadcasting scalars (ONNX semantics on 1-d inputs)."""
    if not any(isinstance(v, tuple) for v in operands):
        return fn(*operands)
    length = max(len(v) for v in operands if isinstance(v, tuple))
    columns = [v if isinstance(v, tuple) and len(v) == length else _sizes(v) * length for v in operands]
    return tuple(fn(*row) for row in zip(*columns))


def _elementwise(tensor_fn: Callable[..., Any], shape_fn: Callable[..., Any] | None = None) -> Op:
    """An element-wise operator: ``tensor_fn`` when any operand is a tensor, else ``shape_fn`` on shape values."""

    def op(x: list[Any], a: dict[str, Any]) -> Any:
        if any(isinstance(v, torch.Tensor) for v in x):
            return tensor_fn(*x)
        return _shape_elementwise(shape_fn or tensor_fn, *x)

    return op


def _symmetric_pads(a: dict[str, Any], spatial: int) -> list[int]:
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ArtifactError(f"auto_pad={a['auto_pad']!r} is not supported")
    pads = a.get("pads", [0] * 2 * spatial)
    if pads[:spatial] != pads[spatial:]:
        raise ArtifactError(f"asymmetric padding {pads} is not supported")
    return pads[:spatial]


def _conv(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    bias = x[2] if len(x) > 2 else None
    return F.conv2d(x[0], x[1], bias, a.get("strides", 1), _symmetric_pads(a, 2), a.get("dilations", 1),
                    a.get("group", 1))


def _max_pool(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    return F.max_pool2d(x[0], a["kernel_shape"], a.get("strides", 1), _symmetric_pads(a, 2), a.get("dilations", 1),
                        bool(a.get("ceil_mode", 0)))


def _average_pool(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    return F.avg_pool2d(x[0], a["kernel_shape"], a.get("strides", 1), _symmetric_pads(a, 2),
                        bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))


def _gemm(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    left = x[0].t() if a.get("transA") else x[0]
    right = x[1].t() if a.get("transB") else x[1]
    out = a.get("alpha", 1.0) * (left @ right)
    return out + a.get("beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else out


def _reshape(x: list[Any], a: dict[str, Any]) -> Any:
    if _is_shape_value(x[0]):  # a shape vector reshaped to 1-d (the exporter does this before Expand)
        return _sizes(x[0])
    shape = _sizes(x[1])
    if not a.get("allowzero"):
        shape = tuple(x[0].shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(shape))
    return x[0].reshape(shape)


def _axes(x: list[Any], a: dict[str, Any]) -> list[int]:
    """Axes from the attribute (before opset 13) or the second input (from opset 13)."""
    axes = a.get("axes", x[1] if len(x) > 1 else None)
    return [int(v) for v in _sizes(axes)] if axes is not None else []


def _unsqueeze(x: list[Any], a: dict[str, Any]) -> Any:
    if _is_shape_value(x[0]):
        if isinstance(x[0], tuple) or _axes(x, a) != [0]:
            raise ArtifactError("Unsqueeze of a shape value is supported only from a scalar along axis 0")
        return (x[0],)
    out = x[0]
    rank = out.dim() + len(_axes(x, a))
    for axis in sorted(axis % rank for axis in _axes(x, a)):
        out = out.unsqueeze(axis)
    return out


def _shape(x: list[Any], a: dict[str, Any]) -> tuple[Size, ...]:
    if _is_shape_value(x[0]):
        shape: tuple[Size, ...] = (len(x[0]),) if isinstance(x[0], tuple) else ()
    else:
        shape = tuple(x[0].shape)
    return shape[a.get("start", 0) : a.get("end")]


def _gather(x: list[Any], a: dict[str, Any]) -> Any:
    data, indices, axis = x[0], x[1], a.get("axis", 0)
    if isinstance(data, tuple):
        return tuple(data[i] for i in indices) if isinstance(indices, tuple) else data[indices]
    if isinstance(indices, int):
        return data.select(axis, indices)
    raise ArtifactError("Gather of a tensor is supported only with a scalar constant index")


def _concat(x: list[Any], a: dict[str, Any]) -> Any:
    if all(_is_shape_value(v) for v in x):
        return tuple(size for v in x for size in _sizes(v))
    return torch.cat(x, a["axis"])


def _slice(x: list[Any], a: dict[str, Any]) -> Any:
    data = x[0]
    rank = 1 if isinstance(data, tuple) else data.dim()
    starts, ends = _sizes(x[1]), _sizes(x[2])
    axes = _sizes(x[3]) if len(x) > 3 and x[3] is not None else tuple(range(len(starts)))
    steps = _sizes(x[4]) if len(x) > 4 and x[4] is not None else (1,) * len(starts)
    if any(step < 1 for step in steps):
        raise ArtifactError(f"Slice with steps {steps} is not supported")
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis % rank] = slice(start, end, step)
    return data[index[0]] if isinstance(data, tuple) else data[tuple(index)]


def _expand(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    """ONNX ``Expand`` broadcasts both ways: a 1 in ``shape`` keeps the input's size (-1 for ``Tensor.expand``)."""
    data, shape = x[0], _sizes(x[1])
    new_dims = len(shape) - data.dim()
    target = [
        (1 if axis < new_dims else -1) if isinstance(size, int) and size == 1 else size
        for axis, size in enumerate(shape)
    ]
    return data.expand([*([1] * -new_dims), *target] if new_dims < 0 else target)


def _constant_of_shape(x: list[Any], a: dict[str, Any]) -> Any:
    value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    shape = _sizes(x[0])
    if value.dtype.kind in "iu" and len(shape) == 1:  # a shape vector being built (e.g. ones for Expand)
        return (int(value.item()),) * int(shape[0])
    return torch.full(shape, value.item(), dtype=torch.from_numpy(value).dtype)


def _where(x: list[Any], a: dict[str, Any]) -> Any:
    if any(isinstance(v, torch.Tensor) for v in x):
        return torch.where(*x)
    return _shape_elementwise(lambda condition, yes, no: yes if condition else no, *x)


def _split(x: list[Any], a: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    axis = a.get("axis", 0)
    sizes = x[1] if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        return torch.tensor_split(x[0], a["num_outputs"], axis)
    return torch.split(x[0], list(_sizes(sizes)), axis)


def _layer_norm(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    bias = x[2] if len(x) > 2 else None
    return F.layer_norm(x[0], x[0].shape[a.get("axis", -1) :], x[1], bias, a.get("epsilon", 1e-5))


def _cast(x: list[Any], a: dict[str, Any]) -> Any:
    if _is_shape_value(x[0]) and a["to"] == onnx.TensorProto.INT64:
        return x[0]
    return x[0].to(_DTYPES[a["to"]])


OPS: dict[str, Op] = {
    "Conv": _conv,
    "BatchNormalization": lambda x, a: F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5)),
    "LayerNormalization": _layer_norm,
    "Relu": lambda x, a: F.relu(x[0]),
    "Erf": lambda x, a: torch.erf(x[0]),
    "Add": _elementwise(operator.add),
    "Sub": _elementwise(operator.sub),
    "Mul": _elementwise(operator.mul),
    "Div": _elementwise(operator.truediv, operator.floordiv),
    "Equal": _elementwise(torch.eq, operator.eq),
    "Where": _where,
    "Transpose": lambda x, a: x[0].permute(*a["perm"]),
    "Cast": _cast,
    "GlobalAveragePool": lambda x, a: F.adaptive_avg_pool2d(x[0], 1),
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "ReduceMean": lambda x, a: x[0].mean(dim=_axes(x, a), keepdim=bool(a.get("keepdims", 1))),
    "Flatten": lambda x, a: torch.flatten(x[0], a.get("axis", 1)),
    "Gemm": _gemm,
    "MatMul": lambda x, a: x[0] @ x[1],
    "Reshape": _reshape,
    "Identity": lambda x, a: x[0],
    "Softmax": lambda x, a: torch.softmax(x[0], a.get("axis", -1)),
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda x, a: x[0].squeeze(tuple(_axes(x, a))) if _axes(x, a) else x[0].squeeze(),
    "Shape": _shape,
    "Gather": _gather,
    "Concat": _concat,
    "Slice": _slice,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Split": _split,
}


def _shape_value(array: np.ndarray) -> ShapeValue:
    return int(array) if array.ndim == 0 else tuple(int(v) for v in array)


class OnnxModule(nn.Module):
    """Executes ``model``'s graph with PyTorch operators; inputs positionally, in the graph's input order."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - set(OPS) - {"Constant"})
        if unsupported:
            raise ArtifactError(f"ONNX operators not supported by the importer: {', '.join(unsupported)}")
        self._constants: dict[str, ShapeValue | float] = {}
        self._buffers_by_name: dict[str, str] = {}
        for initializer in graph.initializer:
            self._add_constant(initializer.name, numpy_helper.to_array(initializer))
        self._nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        for node in graph.node:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self._add_constant(node.output[0], numpy_helper.to_array(attributes["value"]))
                continue
            attributes = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in attributes.items()}
            if node.op_type == "Split":  # before opset 18 the part count is the number of outputs
                attributes.setdefault("num_outputs", len(node.output))
            self._nodes.append((node.op_type, list(node.input), list(node.output), attributes))
        known = set(self._constants) | set(self._buffers_by_name)
        self._inputs = [i.name for i in graph.input if i.name not in known]
        self._output = graph.output[0].name

    def _add_constant(self, name: str, array: np.ndarray) -> None:
        """0-d and 1-d integers become shape values, other 0-d floats Python floats, everything else a buffer."""
        if array.dtype.kind in "iu" and array.ndim <= 1:
            self._constants[name] = _shape_value(array)
        elif array.dtype.kind == "f" and array.ndim == 0:
            self._constants[name] = float(array)
        else:
            buffer = f"w{len(self._buffers_by_name)}"
            self.register_buffer(buffer, torch.from_numpy(array.copy()))
            self._buffers_by_name[name] = buffer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = dict(zip(self._inputs, inputs))
        values.update({name: getattr(self, buffer) for name, buffer in self._buffers_by_name.items()})
        values.update(self._constants)
        for op_type, names, outputs, attributes in self._nodes:
            result = OPS[op_type]([values[n] if n else None for n in names], attributes)
            values.update(zip(outputs, result) if len(outputs) > 1 else [(outputs[0], result)])
        return values[self._output]


def load_onnx(path: Path) -> OnnxModule:
    """Load and check an ONNX file; raises ``ArtifactError`` with the reason when it cannot be used."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (OSError, onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ArtifactError(f"cannot read ONNX model {path}: {exc}") from exc
    return OnnxModule(model).eval()
