"""Find cut points in a traced model and split it into blocks there.

A *cut point* is a position in the topologically ordered graph where exactly one live value depends on the primary
input: everything the rest of the model needs from the input flows through that one tensor, so a ramp reading it sees
all the state there is. Other live values may only depend on side inputs or constants (an attention mask and what is
derived from it); they are handed from block to block unchanged. Inside a residual block two values are live (the
branch and the shortcut), so cut points fall exactly on block boundaries without any per-model rule.

Candidates are coarsened so that each is separated from the previous one by at least one heavy operator
(convolution, linear, matmul, attention): the last position of a run with no heavy operator in between is kept (after
the activation, not before it). Positions before the first heavy operator or leaving less than ``min_tail_fraction``
of the model's FLOPs after them are dropped: a ramp there cannot save anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from early_exit.errors import ArtifactError

_HEAVY_TARGETS = {
    "convolution",
    "conv1d",
    "conv2d",
    "conv3d",
    "linear",
    "addmm",
    "mm",
    "bmm",
    "matmul",
    "baddbmm",
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
}


@dataclass(frozen=True)
class CutPoint:
    """A position right after ``node`` (its output is the primary value carried on).

    Args:
        index: position of ``node`` in the graph's node list.
        node: name of the node producing the carried value.
        flops_before: estimated FLOPs of everything up to and including ``node`` (per sample of the traced batch).
        flops_total: estimated FLOPs of the whole model.
    """

    index: int
    node: str
    flops_before: float
    flops_total: float

    @property
    def depth(self) -> float:
        """Fraction of the model's FLOPs done before the cut."""
        return self.flops_before / self.flops_total if self.flops_total else 0.0


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _hint(value: object) -> int:
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def node_flops(node: fx.Node) -> float:
    """Rough multiply-accumulate count of a heavy operator (0 for everything else), from traced shapes."""
    if node.op != "call_function" or _op_name(node) not in _HEAVY_TARGETS:
        return 0.0
    out = node.meta.get("val")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return 0.0
    out_numel = math.prod(_hint(d) for d in out.shape)
    weight = node.args[1] if len(node.args) > 1 else None
    weight_val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    name = _op_name(node)
    if name.startswith("conv") and isinstance(weight_val, torch.Tensor):
        return float(out_numel * math.prod(_hint(d) for d in weight_val.shape[1:]))
    if "attention" in name:
        query = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if isinstance(query, torch.Tensor):
            return float(2 * out_numel * _hint(query.shape[-2]))
        return float(out_numel)
    first = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if name == "addmm":  # addmm(bias, input, weight)
        first = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if isinstance(first, torch.Tensor):
        return float(out_numel * _hint(first.shape[-1]))
    return float(out_numel)


def _is_symbolic_scalar(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.SymInt)


def _same_size_in_inputs(size: fx.Node, user: fx.Node) -> tuple[fx.Node, int] | None:
    """A tensor input of ``user`` and one of its dimensions that has the symbolic size ``size`` reads, if any."""
    expr = size.meta["val"].node.expr
    for tensor in user.all_input_nodes:
        value = tensor.meta.get("val")
        if isinstance(value, torch.Tensor):
            for dim, extent in enumerate(value.shape):
                if isinstance(extent, torch.SymInt) and extent.node.expr == expr:
                    return tensor, dim
    return None


def localize_symbolic_scalars(module: fx.GraphModule) -> fx.GraphModule:
    """Recompute every symbolic scalar (``sym_size`` of the batch and arithmetic on it) right before each use.

    Exported graphs compute the batch size once and reuse it everywhere; left alone, that integer would have to be
    handed from block to block, and an exported block cannot take a dynamic integer input. Each ``sym_size`` is read
    from a tensor the user already consumes when one has that size (``x.reshape(x.shape[0], ...)`` in attention code
    otherwise reads the model input, which would then stay live through the whole model and leave no cut point).
    Other tensors feeding the recomputation are untouched, so a scalar derived from a value that is not live at a cut
    still prevents the cut.
    """
    graph = module.graph

    def clone(node: fx.Node, before: fx.Node) -> fx.Node:
        with graph.inserting_before(before):
            copy = graph.node_copy(
                node, lambda arg: clone(arg, before) if isinstance(arg, fx.Node) and _is_symbolic_scalar(arg) else arg
            )
        source = _same_size_in_inputs(node, before) if node.target is torch.ops.aten.sym_size.int else None
        if source is not None:
            copy.args = source
        return copy

    for node in list(graph.nodes):
        for arg in list(node.all_input_nodes):
            if _is_symbolic_scalar(arg) and not _is_symbolic_scalar(node):
                node.replace_input_with(arg, clone(arg, node))
    graph.eliminate_dead_code()
    module.recompile()
    return module


def _is_state(node: fx.Node) -> bool:
    """Values that count towards the live state: tensors computed at run time (not weights, not shape ints)."""
    return node.op in ("placeholder", "call_function", "call_method", "call_module") and isinstance(
        node.meta.get("val"), torch.Tensor
    )


def find_cut_points(graph: fx.Graph, primary_index: int = 0, min_tail_fraction: float = 0.02) -> list[CutPoint]:
    """Cut points of ``graph`` in execution order (see the module docstring for the rules).

    Args:
        graph: an ATen-level graph with ``meta['val']`` on its nodes (from ``torch.export``).
        primary_index: position among the graph's inputs of the one all cut points must carry (image, token ids).
        min_tail_fraction: drop cut points leaving less than this fraction of FLOPs after them.
    """
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not 0 <= primary_index < len(placeholders):
        raise ArtifactError(f"graph has {len(placeholders)} inputs; primary input {primary_index} does not exist")
    primary: set[fx.Node] = set()
    for node in nodes:
        if node is placeholders[primary_index] or any(arg in primary for arg in node.all_input_nodes):
            primary.add(node)
    last_use = {node: max((position[u] for u in node.users), default=position[node]) for node in nodes}
    flops = [node_flops(node) for node in nodes]
    total = sum(flops)
    done = 0.0
    live: set[fx.Node] = set()
    raw: list[tuple[CutPoint, int]] = []
    heavy_seen = 0
    for i, node in enumerate(nodes):
        done += flops[i]
        heavy_seen += flops[i] > 0
        live = {v for v in live if last_use[v] > i}
        if last_use[node] > i and _is_state(node):
            live.add(node)
        carried = [v for v in live if v in primary]
        if heavy_seen and len(carried) == 1 and carried[0] is node and node.users:
            raw.append((CutPoint(i, node.name, done, total), heavy_seen))
    # Coarsen: among candidates with no heavy operator between them keep the last; drop the useless tail.
    kept: list[CutPoint] = []
    for k, (cut, heavy_count) in enumerate(raw):
        next_heavy = raw[k + 1][1] if k + 1 < len(raw) else None
        if next_heavy == heavy_count:
            continue
        if total and (total - cut.flops_before) / total < min_tail_fraction:
            continue
        kept.append(cut)
    return kept


def split_at(module: fx.GraphModule, cuts: Sequence[CutPoint]) -> fx.GraphModule:
    """Partition ``module`` so that partition ``k`` ends right after cut ``k`` (``len(cuts) + 1`` partitions).

    Returns the top-level module produced by ``torch.fx.passes.split_module``: its graph calls ``submod_0``,
    ``submod_1``, … in order, passing side values along as extra inputs.
    """
    from torch.fx.passes.split_module import split_module

    boundaries = sorted(cut.index for cut in cuts)
    nodes = list(module.graph.nodes)
    partition_of = {}
    for i, node in enumerate(nodes):
        partition_of[node] = sum(1 for b in boundaries if i > b)
    return split_module(module, None, lambda node: partition_of[node], keep_original_order=True)
