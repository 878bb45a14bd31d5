"""Common view ops merged: one node per ``view``/``t``/... of one value with one set of
arguments.

AOTAutograd's graphs are not CSE'd the way we need them.  Each linear on an N-d input
adds its own ``view(x, [M, K])``; in a training graph autograd then saves each linear's
view for its weight gradient, and the backward receives them as *separate* inputs, so
nothing there can tell that ``dWq = dq^T @ x``, ``dWk = dk^T @ x`` and ``dWv = dv^T @ x``
read one ``x`` (and group them into one launch).  Merged before autograd, the three
linears share one view, which the partitioner saves once.

Only view ops are merged (they are free and pure), and not those the graph returns (two
returned views stay two tensors); a mutation (``copy_`` of a graph input, any op whose
schema mutates) starts a new generation, so a view taken after it is never merged with
one taken before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["draws_random", "fold_view_sizes", "merge_views", "mutates", "op_mutates"]

_aten = torch.ops.aten
_VIEWS = frozenset(
    {
        _aten.view.default,
        _aten._unsafe_view.default,
        _aten.reshape.default,
        _aten.t.default,
        _aten.transpose.int,
        _aten.permute.default,
        _aten.expand.default,
        _aten.unsqueeze.default,
        _aten.squeeze.dim,
        _aten.squeeze.dims,
        _aten.squeeze.default,
        _aten.slice.Tensor,
        _aten.select.int,
        _aten.alias.default,
    }
)


def _frozen(x):
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in x.items()))
    if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.SymInt):
        # a size computed by its own nodes for each view (dynamic shapes): equal
        # expressions are one size
        return ("sym", str(x.meta["val"].node.expr))
    return x


_SIZED_VIEWS = frozenset({_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default})


def fold_view_sizes(gm: fx.GraphModule) -> int:
    """Each ``sym_size(view(x, sizes), d)`` becomes the view's own ``sizes[d]`` (when it
    is a size node), so a view read only for its size (dynamic shapes' way to compute
    the next view's size) has no user left to keep it, or the value it views, written.
    Returns how many were folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _aten.sym_size.int:
            continue
        src, d = node.args[:2]
        if not (isinstance(src, fx.Node) and src.target in _SIZED_VIEWS):
            continue
        sizes = src.args[1] if len(src.args) > 1 else None
        if not isinstance(sizes, (list, tuple)) or not -len(sizes) <= d < len(sizes):
            continue
        size = sizes[d]
        if isinstance(size, fx.Node) and isinstance(size.meta.get("val"), torch.SymInt):
            node.replace_all_uses_with(size)
            gm.graph.erase_node(node)
            folded += 1
    if folded:
        gm.recompile()
    return folded


def op_mutates(target: Any) -> bool:
    """``target`` is an op whose schema mutates an argument (``copy_``, ``add_``, ...)."""
    schema = getattr(target, "_schema", None)
    return schema is not None and schema.is_mutable


def draws_random(target: Any) -> bool:
    """``target`` draws from torch's generator (``native_dropout``, ``rand``, ...)."""
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def mutates(node: fx.Node) -> bool:
    """``node`` may mutate something: an op that says so, or a Python callable other than
    ``getitem`` and symbolic arithmetic (assumed to)."""
    if node.op != "call_function":
        return False
    if getattr(node.target, "_schema", None) is None:
        module = getattr(node.target, "__module__", None)
        name = getattr(node.target, "__name__", "")
        return not (module in ("_operator", "operator", "math") or name.startswith("sym_"))
    return op_mutates(node.target)


def merge_views(gm: fx.GraphModule) -> int:
    """Merge ``gm``'s duplicate view ops in place; return how many were removed."""
    seen: dict[tuple, fx.Node] = {}
    generation = removed = 0
    for node in list(gm.graph.nodes):
        if mutates(node):
            generation += 1
            continue
        if node.op != "call_function" or node.target not in _VIEWS:
            continue
        if any(u.op == "output" for u in node.users):
            continue  # (a returned view stays its own tensor, as in eager)
        try:
            key = (generation, node.target, _frozen(node.args), _frozen(node.kwargs))
            hash(key)
        except TypeError:  # an unhashable argument: leave it
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return removed
