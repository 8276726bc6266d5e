"""Run an ONNX graph as a PyTorch module, so ``torch.export`` can trace it and ``prepare`` can cut it.

A small interpreter over the ONNX operators that CNN classifiers exported from PyTorch use (convolution, batch norm,
pooling, element-wise arithmetic, GEMM, reshapes). Float initializers become buffers; integer initializers and
``Constant`` nodes stay Python values because they are shapes and axes, which tracing needs as concrete numbers.
An operator outside the set fails at construction time with its name, not halfway through a trace.
"""

from __future__ import annotations

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

Op = Callable[[list[Any], dict[str, Any]], Any]


def _conv(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    pads = a.get("pads", [0, 0, 0, 0])
    if pads[: len(pads) // 2] != pads[len(pads) // 2 :]:
        raise ArtifactError(f"asymmetric Conv padding {pads} is not supported")
    bias = x[2] if len(x) > 2 else None
    return F.conv2d(x[0], x[1], bias, a.get("strides", 1), pads[: len(pads) // 2], a.get("dilations", 1),
                    a.get("group", 1))


def _gemm(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    left = x[0].t() if a.get("transA") else x[0]
    right = x[1].t() if a.get("transB") else x[1]
    out = a.get("alpha", 1.0) * (left @ right)
    return out + a.get("beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else out


def _reshape(x: list[Any], a: dict[str, Any]) -> torch.Tensor:
    shape = [int(d) for d in np.asarray(x[1]).reshape(-1)]
    shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


def _axes(x: list[Any], a: dict[str, Any]) -> list[int]:
    axes = a.get("axes", x[1] if len(x) > 1 else None)
    return [int(v) for v in np.asarray(axes).reshape(-1)] if axes is not None else []


OPS: dict[str, Op] = {
    "Conv": _conv,
    "BatchNormalization": lambda x, a: F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5)),
    "Relu": lambda x, a: F.relu(x[0]),
    "Add": lambda x, a: x[0] + x[1],
    "Sub": lambda x, a: x[0] - x[1],
    "Mul": lambda x, a: x[0] * x[1],
    "Div": lambda x, a: x[0] / x[1],
    "Transpose": lambda x, a: x[0].permute(*a["perm"]),
    "Cast": lambda x, a: x[0].to(_DTYPES[a["to"]]),
    "GlobalAveragePool": lambda x, a: F.adaptive_avg_pool2d(x[0], 1),
    "AveragePool": lambda x, a: F.avg_pool2d(x[0], a["kernel_shape"], a.get("strides"), a.get("pads", [0, 0])[:2]),
    "MaxPool": lambda x, a: F.max_pool2d(x[0], a["kernel_shape"], a.get("strides"), a.get("pads", [0, 0])[:2]),
    "ReduceMean": lambda x, a: x[0].mean(dim=_axes(x, a), keepdim=bool(a.get("keepdims", 1))),
    "Flatten": lambda x, a: torch.flatten(x[0], a.get("axis", 1)),
    "Gemm": _gemm,
    "MatMul": lambda x, a: x[0] @ x[1],
    "Reshape": _reshape,
    "Identity": lambda x, a: x[0],
    "Softmax": lambda x, a: torch.softmax(x[0], a.get("axis", -1)),
    "Unsqueeze": lambda x, a: x[0].reshape([*x[0].shape[: _axes(x, a)[0]], 1, *x[0].shape[_axes(x, a)[0] :]]),
    "Squeeze": lambda x, a: x[0].squeeze(tuple(_axes(x, a))) if _axes(x, a) else x[0].squeeze(),
}


class OnnxModule(nn.Module):
    """Executes ``model``'s graph with PyTorch operators; inputs positionally, in the graph's input order."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - set(OPS) - {"Constant"})
        if unsupported:
            raise ArtifactError(f"ONNX operators not supported by the importer: {', '.join(unsupported)}")
        self._constants: dict[str, Any] = {}
        self._buffers_by_name: dict[str, str] = {}
        for index, initializer in enumerate(graph.initializer):
            array = numpy_helper.to_array(initializer)
            if array.dtype.kind == "f":
                self.register_buffer(f"w{index}", torch.from_numpy(array.copy()))
                self._buffers_by_name[initializer.name] = f"w{index}"
            else:
                self._constants[initializer.name] = array
        self._nodes = []
        for node in graph.node:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self._constants[node.output[0]] = numpy_helper.to_array(attributes["value"])
                continue
            attributes = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in attributes.items()}
            self._nodes.append((node.op_type, list(node.input), list(node.output), attributes))
        known = set(self._constants) | set(self._buffers_by_name)
        self._inputs = [i.name for i in graph.input if i.name not in known]
        self._output = graph.output[0].name

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = dict(zip(self._inputs, inputs))
        values.update({name: getattr(self, buffer) for name, buffer in self._buffers_by_name.items()})
        values.update(self._constants)
        for op_type, names, outputs, attributes in self._nodes:
            args = [values[n] if n else None for n in names]
            args = [torch.as_tensor(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for v in args]
            values[outputs[0]] = OPS[op_type](args, attributes)
        return values[self._output]


def load_onnx(path: Path) -> OnnxModule:
    """Load and check an ONNX file; raises ``ArtifactError`` with the reason when it cannot be used."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (OSError, onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ArtifactError(f"cannot read ONNX model {path}: {exc}") from exc
    return OnnxModule(model).eval()
