"""Turn a split graph into self-contained block modules and export each with a dynamic batch dimension."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from controller.prepare.cutpoints import CutPoint
from early_exit.runtime import strip_runtime_asserts


class Block(nn.Module):
    """One partition of the split graph with its weights bound, taking only run-time values.

    Args:
        partition: the ``submod_<k>`` graph module from ``split_module``.
        arguments: for each of its parameters, either a run-time value name (``str``) or a bound constant tensor.
        output_order: permutation putting the primary (carried) value first.
    """

    def __init__(self, partition: fx.GraphModule, arguments: Sequence[str | torch.Tensor], output_order: list[int]):
        super().__init__()
        self.partition = partition
        self._slots: list[tuple[str, int]] = []  # ("input", i) or ("const", j)
        inputs = 0
        for index, argument in enumerate(arguments):
            if isinstance(argument, str):
                self._slots.append(("input", inputs))
                inputs += 1
            else:
                name = f"const_{index}"
                if isinstance(argument, nn.Parameter):
                    self.register_parameter(name, argument)
                else:
                    self.register_buffer(name, argument)
                self._slots.append(("const", index))
        self.output_order = output_order

    def forward(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = [values[i] if kind == "input" else getattr(self, f"const_{i}") for kind, i in self._slots]
        out = self.partition(*args)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(out[i] for i in self.output_order)


@dataclass
class BlockPlan:
    """A block ready for export: module, names of the values it consumes and produces (primary output first)."""

    module: Block
    inputs: list[str]
    outputs: list[str]


def _resolve_attr(module: nn.Module, target: str) -> torch.Tensor:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part)
    assert isinstance(value, torch.Tensor)
    return value


def plan_blocks(top: fx.GraphModule, cuts: Sequence[CutPoint], input_names: Sequence[str]) -> list[BlockPlan]:
    """Walk the top-level graph of ``split_at`` and build one ``BlockPlan`` per partition.

    Value names are the top-level graph's node names; model inputs keep ``input_names`` (the served tensor names).
    """
    rename: dict[str, str] = {}
    placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]
    for node, served in zip(placeholders, input_names):
        rename[node.name] = served
    plans: list[BlockPlan] = []
    calls = [n for n in top.graph.nodes if n.op == "call_module" and str(n.target).startswith("submod_")]
    for k, call in enumerate(calls):
        partition = strip_runtime_asserts(getattr(top, str(call.target)))
        arguments: list[str | torch.Tensor] = []
        inputs: list[str] = []
        for arg in call.args:
            assert isinstance(arg, fx.Node)
            if arg.op == "get_attr":
                arguments.append(_resolve_attr(top, str(arg.target)))
            else:
                name = rename.get(arg.name, arg.name)
                arguments.append(name)
                inputs.append(name)
        returned = partition.graph.output_node().args[0] if hasattr(partition.graph, "output_node") else None
        returned_nodes = list(returned) if isinstance(returned, (tuple, list)) else [returned]
        users = {u.args[1]: u.name for u in call.users if u.op == "call_function" and len(u.args) == 2}
        names = [users.get(i, call.name) for i in range(len(returned_nodes))] if len(returned_nodes) > 1 else [call.name]
        primary_name = cuts[k].node if k < len(cuts) else None
        primary = next((i for i, n in enumerate(returned_nodes) if getattr(n, "name", None) == primary_name), 0)
        order = [primary] + [i for i in range(len(names)) if i != primary]
        plans.append(BlockPlan(Block(partition, arguments, order), inputs, [names[i] for i in order]))
    return plans


def export_block(plan: BlockPlan, example: Sequence[torch.Tensor], path: Path) -> None:
    """Export ``plan.module`` with dimension 0 of every input dynamic (the batch, unbounded) and save it."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = (tuple({0: batch} for _ in example),)  # one entry: the *values varargs
    program = torch.export.export(plan.module, tuple(example), dynamic_shapes=dynamic, strict=False)
    torch.export.save(program, str(path))
