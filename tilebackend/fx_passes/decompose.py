"""Hand Inductor the anchors we did not replace as Inductor would have had them.

The decomposition table we give AOTAutograd keeps our anchor ops whole (a softmax
stays ``aten._softmax``) so the patterns can find them.  An anchor no pattern took (a
disabled pattern, a case a kernel refuses, a rewrite that failed) would then reach
Inductor undecomposed: torch 2.11's Inductor refuses to compile it ("both a fallback
and a decomp for same op"), and later ones run it as an unfused ATen call.  So those
ops are decomposed here, with Inductor's own decompositions, by retracing the graph.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback

from .. import _compat

__all__ = ["decompose_leftovers"]


def decompose_leftovers(
    gm: fx.GraphModule, table: Mapping[Any, Callable], then: Mapping[Any, Callable] = {}
) -> tuple[fx.GraphModule, dict[str, int]]:
    """``gm`` with each call to an op of ``table`` decomposed by ``table``'s function,
    and the ops of ``then`` those decompositions emit decomposed too (Inductor's table:
    a mixed-dtype layer norm's decomposition casts with ``aten._to_copy``, which
    Inductor refuses whole); how many calls of ``table``'s ops there were.  ``gm`` itself
    is returned when its own graph has none; its subgraphs (a ``torch.cond`` branch, a
    ``nested_compile_region``'s body) are decomposed first, each retraced on its own,
    and put back in place."""
    found: collections.Counter[str] = collections.Counter()
    for name, child in list(gm.named_children()):
        if isinstance(child, fx.GraphModule):
            new_child, got = decompose_leftovers(child, table, then)
            if new_child is not child:
                setattr(gm, name, new_child)
            found.update(got)
    own = collections.Counter(
        str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target in table
    )
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if not own or any(v is None for v in vals):  # (no example values: cannot retrace)
        return gm, dict(found)
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = _compat.detect_fake_mode(vals)
    with fake_mode or contextlib.nullcontext(), fx_traceback.preserve_node_meta():
        new = make_fx(_Run(gm), decomposition_table={**then, **table})(*vals)
    _drop_dead_casts(new)
    return new, dict(found + own)


def _drop_dead_casts(gm: fx.GraphModule) -> None:
    """Erase the unused casts a decomposition traced before giving up: Inductor's
    ``pw_cast_for_opmath`` decompositions (its ``mm`` on the CPU) upcast their inputs,
    then return ``NotImplemented`` and the op is kept whole, leaving the casts behind;
    Inductor has no lowering for a bare ``aten._to_copy``."""
    casts = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)
    dead = [n for n in gm.graph.nodes if n.target in casts and not n.users]
    for n in reversed(dead):
        gm.graph.erase_node(n)
    if dead:
        gm.recompile()


class _Run:
    """``gm`` run node by node (the retrace sees the graph's ops, not its Python)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __call__(self, *args: Any) -> Any:
        return fx.Interpreter(self.gm).run(*args)
