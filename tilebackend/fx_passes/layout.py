"""Keep the memory layout the graph was traced with wherever a replacement stands in for
a value.

Eager's pointwise ops and softmax give their result the layout of their input (a norm
written out over ``q.transpose(1, 2)`` keeps ``q``'s memory order); the tile kernels write
contiguous results.  The ops after a replaced value were traced for its old strides: an
``aten.view`` there fails ("view size is not compatible with input tensor's size and
stride") and a ``as_strided`` would read the wrong elements.  So each value a rewrite or a
fusion substituted is compared, at every op that reads it, with the value it replaced:
when their dense stride orders differ, the new value is copied into the traced order
(``permute``, ``clone``, ``permute`` back: static dims, so symbolic sizes are fine).  A
contiguous value replacing a contiguous one, the common case, costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from . import shapes

aten = torch.ops.aten


def _flat_inputs(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def snapshot(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Which value each op reads, in argument order (before a pass changes them)."""
    return {n: _flat_inputs(n) for n in graph.nodes}


def _order(v: Any) -> tuple[int, ...] | None:
    """The dims of a dense tensor value from the outermost in memory to the innermost
    (size-1 dims, whose strides mean nothing, left out); None when it is not a dense
    tensor, or its size hints are not known."""
    if not isinstance(v, torch.Tensor):
        return None
    try:
        size = [int(shapes.hint(s)) for s in v.shape]
        stride = [int(shapes.hint(s)) for s in v.stride()]
    except (TypeError, ValueError, RuntimeError):
        return None
    dims = [d for d in range(len(size)) if size[d] != 1]
    if any(size[d] == 0 for d in dims):
        return None
    dims.sort(key=lambda d: (-stride[d], -d))
    expected = 1
    for d in reversed(dims):  # dense: each stride is the product of the inner sizes
        if stride[d] != expected:
            return None
        expected *= size[d]
    return tuple(dims)


def _wanted(old: fx.Node, new: fx.Node) -> list[int] | None:
    """The permutation that lays ``new`` out as ``old`` was traced, or None when it
    already is (or either layout is not a dense one this can restore)."""
    vo, vn = old.meta.get("val"), new.meta.get("val")
    if not isinstance(vo, torch.Tensor) or not isinstance(vn, torch.Tensor):
        return None
    if vo.dim() != vn.dim() or vo.dim() < 2:
        return None
    want, have = _order(vo), _order(vn)
    if want is None or have is None or want == have:
        return None
    rest = [d for d in range(vo.dim()) if d not in want]  # size-1 dims: anywhere
    return [*rest, *want]


#: meta key marking the last node of a layout copy (see :func:`undo`)
COPY = "tilebackend_layout_copy"


def undo(gm: fx.GraphModule, notes: list[str]) -> int:
    """Take out the layout copies an earlier pass added (the readers read the value
    itself again), so that a later pass sees the ops after it (a norm's epilogue grows
    over them) and restores the layouts itself, once, where they are still needed; the
    copies' notes go too.  Returns how many were taken out."""
    graph = gm.graph
    fixes = [n for n in graph.nodes if n.meta.get(COPY)]
    for fix in fixes:
        if fix.meta[COPY] in notes:
            notes.remove(fix.meta[COPY])
        clone = fix.args[0]
        value = clone.args[0].args[0]
        fix.replace_all_uses_with(value)
        for n in (fix, clone, clone.args[0]):
            if not n.users:
                graph.erase_node(n)
    return len(fixes)


def restore(
    gm: fx.GraphModule,
    before: dict[fx.Node, list[fx.Node]],
    notes: list[str],
    outputs: bool = True,
) -> int:
    """After a pass: give each op that read a value the pass replaced the traced layout
    of what it read before (see the module doc).  ``outputs=False``: not the graph's
    outputs (a backward's gradients, whose layout nothing reads: autograd accumulates
    them in the parameter's).  Returns how many copies were added."""
    from .matcher import _fake_mode_of, _set_meta

    graph = gm.graph
    fake_mode = _fake_mode_of(gm)
    made: dict[tuple[fx.Node, tuple[int, ...]], fx.Node] = {}
    for user in list(graph.nodes):
        old_inputs = before.get(user)
        if user.op == "output" and not outputs:
            continue
        now = _flat_inputs(user)
        if old_inputs is None or len(old_inputs) != len(now):
            continue
        for old, new in zip(old_inputs, now):
            if new is old:
                continue
            perm = _wanted(old, new)
            if perm is None:
                continue
            fix = made.get((new, tuple(perm)))
            if fix is None:
                inv = sorted(range(len(perm)), key=perm.__getitem__)
                with graph.inserting_after(new):
                    p = graph.call_function(aten.permute.default, (new, perm))
                with graph.inserting_after(p):
                    c = graph.call_function(
                        aten.clone.default, (p,), {"memory_format": torch.contiguous_format}
                    )
                with graph.inserting_after(c):
                    fix = graph.call_function(aten.permute.default, (c, inv))
                for n in (p, c, fix):
                    _set_meta(n, fake_mode)
                made[(new, tuple(perm))] = fix
                note = (
                    f"{new.name} copied into {old.name}'s traced layout (dims {perm} outer "
                    "to inner) for the ops that read it"
                )
                fix.meta[COPY] = note
                notes.append(note)
            user.replace_input_with(new, fix)
    return len(made)
