"""Grouped GEMMs (see :mod:`.fusion`): plain GEMMs of one input, one launch.

Attention's query, key and value linears (BERT, ViT, Llama) read one normalized input;
an unfused gated MLP does too.  After the epilogue passes, the ``tile::mm`` /
``tile::addmm`` nodes left plain (no epilogue fused) that share their ``a`` become one
``tile::grouped_mm`` (up to :data:`~..codegen.grouped_matmul.MAX_GROUPS` a launch), its
results read back with ``getitem``.  Weights and biases a later GEMM reads are views of
graph inputs: the views move up to the first GEMM, where the grouped call goes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..report import Replacement, describe_value, short_target
from . import shapes
from .fusion_core import _val
from .fusion_matmul import MatmulFusions


class GroupedGemms(MatmulFusions):
    def grouped_gemms(self) -> None:
        """Group the plain 2-D GEMMs of one ``a`` (one dtype; each with a ``[N]`` bias or
        none) into ``tile::grouped_mm`` calls, in graph order."""
        from ..codegen import grouped_matmul

        groups: list[list[tuple[fx.Node, Any, Any, Any]]] = []
        for node in self.graph.nodes:
            parts = self._gemm_parts(node)
            if parts is None:
                continue
            a, b, bias = parts
            va, vb = _val(a), _val(b)
            if va is None or vb is None or va.dim() != 2 or vb.dim() != 2:
                continue
            if bias is not None and getattr(_val(bias), "ndim", None) != 1:
                continue  # (a full [M, N] bias: not this kernel's)
            for group in groups:
                _, a0, b0, _ = group[0]
                if (
                    len(group) < grouped_matmul.MAX_GROUPS
                    and _val(b0).dtype == vb.dtype
                    and self._same_input(a0, a)
                ):
                    group.append((node, a, b, bias))
                    break
            else:
                groups.append([(node, a, b, bias)])
        for group in groups:
            if len(group) > 1:
                self._fuse_grouped(group)

    def _fuse_grouped(self, group: list[tuple[fx.Node, Any, Any, Any]]) -> None:
        from ..codegen import grouped_matmul

        # (operands read afresh: a group fused before may have replaced what these read,
        # as the GEMMs of one result read that result)
        fresh = [(m[0], self._gemm_parts(m[0])) for m in group]
        group = [(n, *parts) for n, parts in fresh if parts is not None]
        if len(group) < 2:
            return
        first = group[0][0]
        order = self._order()
        sunk = self._sinkable(group, order)
        if not isinstance(sunk, str):  # every GEMM goes where the last one is
            kept, at = group, group[-1][0]
        else:  # the later GEMMs' weights move up to the first
            kept, at, why = [group[0]], first, sunk
            sunk = []
            for member in group[1:]:
                operands = [x for x in member[2:] if isinstance(x, fx.Node)]
                if all(self._hoistable(x, first, order) for x in operands):
                    for x in operands:
                        self._hoist(x, first, order)
                    kept.append(member)
                else:
                    self._note(
                        member[0],
                        f"not grouped with {first.name}: its weight is computed later, "
                        f"and the group cannot run there: {why}",
                    )
        if len(kept) < 2:
            return
        a = kept[0][1]
        bs = [m[2] for m in kept]
        biases = [m[3] for m in kept]
        hinted = [None if x is None else shapes.hinted(_val(x)) for x in (a, *bs, *biases)]
        reason = grouped_matmul.check(hinted[0], hinted[1 : 1 + len(bs)], hinted[1 + len(bs) :])
        if reason is not None:
            self._note(first, f"grouped GEMM refused: {reason}")
            return
        graph = self.graph
        with graph.inserting_before(at):
            grouped = graph.call_function(torch.ops.tile.grouped_mm.default, (a, bs, biases))
            self._meta(grouped)
            items = []
            for i in range(len(kept)):
                item = graph.call_function(operator.getitem, (grouped, i))
                self._meta(item)
                items.append(item)
        tail = items[-1]
        for n in sunk:  # (the earlier GEMMs' users, now after their results)
            tail.append(n)
            tail = n
        for (node, a_i, _, _), item in zip(kept, items):
            node.replace_all_uses_with(item)
            graph.erase_node(node)
            if a_i is not a and isinstance(a_i, fx.Node) and not a_i.users:
                graph.erase_node(a_i)  # another view of the shared input
        self.count += 1
        # (the epilogue pass noted why no epilogue fused into them: they run grouped now)
        grouped_names = {m[0].name for m in kept}
        self.report.skipped[:] = [
            s
            for s in self.report.skipped
            if not (s.pattern == "fusion" and s.node in grouped_names)
        ]
        self.report.replacements.append(
            Replacement(
                pattern="grouped_mm",
                nodes=[m[0].name for m in kept],
                targets=[short_target(m[0].target) for m in kept],
                inputs={
                    "a": describe_value(_val(a)),
                    **{f"b{i}": describe_value(_val(b)) for i, b in enumerate(bs)},
                },
                scalars={"groups": len(kept)},
            )
        )

    def _sinkable(
        self, group: list[tuple[fx.Node, Any, Any, Any]], order: dict[fx.Node, int]
    ) -> list[fx.Node] | str:
        """The nodes to move after the grouped call when it goes where the group's last
        GEMM is, or why it cannot: a GEMM's operand derives from an earlier GEMM's
        result, or a node reading an earlier result cannot move (it mutates or draws
        random numbers).  In a backward graph each weight gradient ``x^T @ dy_i`` follows
        the computation of its ``dy_i``, which reads the previous one's results."""
        first, last = group[0][0], group[-1][0]
        members = {m[0] for m in group}
        tainted = set(members) - {last}
        moved: list[fx.Node] = []
        for n in list(self.graph.nodes)[order[first] : order[last]]:
            if n in members or not any(x in tainted for x in n.all_input_nodes):
                continue
            if n.op != "call_function" or _fixed(n):
                return f"{n.name} ({short_target(n.target)}) reads an earlier GEMM's result and cannot move"
            tainted.add(n)
            moved.append(n)
        for m in group:
            if any(x in tainted for x in m[1:] if isinstance(x, fx.Node)):
                return f"{m[0].name}'s operands read an earlier GEMM's result"
        return moved

    @staticmethod
    def _hoistable(x: fx.Node, first: fx.Node, order: dict[fx.Node, int], depth: int = 4) -> bool:
        """``x`` is defined before ``first``, or is a view op whose inputs are (or can be
        moved there in turn, ``depth`` deep)."""
        if order[x] < order[first]:
            return True
        if depth == 0 or x.op != "call_function":
            return False
        if not getattr(x.target, "is_view", False):
            return False
        return all(GroupedGemms._hoistable(y, first, order, depth - 1) for y in x.all_input_nodes)

    def _hoist(self, x: fx.Node, first: fx.Node, order: dict[fx.Node, int]) -> None:
        """Move ``x`` (and what it reads) just before ``first``, keeping their order."""
        if order[x] < order[first]:
            return
        for y in x.all_input_nodes:
            self._hoist(y, first, order)
        first.prepend(x)
        order[x] = order[first] - 0.5  # (now before first)


def _fixed(node: fx.Node) -> bool:
    """``node`` may not change places: it mutates, or it draws random numbers (moving it
    would reorder the generator's draws)."""
    from .cse import draws_random, mutates

    return mutates(node) or draws_random(node.target)
