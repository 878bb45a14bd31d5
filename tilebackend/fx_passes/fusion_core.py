"""Shared pieces of the fusion passes (:mod:`.fusion`): node helpers and the base class
that holds the graph, the report and the shape facts every fusion asks."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..report import GraphReport, Skipped
from . import shapes
from .matcher import _fake_mode_of, _set_meta

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SEED_META = "tilebackend_seed"
#: dtype casts as graphs spell them (with no decompositions, and with Inductor's)
_CASTS = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _is_tensor_node(n: Any) -> bool:
    return isinstance(n, fx.Node) and isinstance(_val(n), torch.Tensor)


def _descendants(root: fx.Node, limit: int = 10_000) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [root]
    while stack and len(seen) < limit:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _single_use(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and len(n.users) == 1


class FuserBase:
    def __init__(self, gm: fx.GraphModule, report: GraphReport) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.report = report
        self.fake_mode = _fake_mode_of(gm)
        self.count = 0
        self.touched = False  # the graph changed with no fusion counted
        self._made: list[fx.Node] = []  # nodes made for a fusion that may not happen
        self.facts = shapes.Facts(shapes.shape_env_of(gm))

    def _same(self, a, b) -> bool:
        """Shapes proven equal for every size (never a guard)."""
        return len(a) == len(b) and all(self.facts.prove_eq(x, y) is True for x, y in zip(a, b))

    def _broadcasts_to(self, small, big) -> bool:
        if len(small) > len(big):
            return False
        return all(
            self.facts.prove_eq(x, 1) is True or self.facts.prove_eq(x, y) is True
            for x, y in zip(reversed(list(small)), reversed(list(big)))
        )

    def _note(self, anchor: fx.Node, why: str) -> None:
        self.report.skipped.append(Skipped(anchor.name, str(anchor.target), "fusion", why))

    def _order(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.graph.nodes)}

    def _erase_unused(self, nodes) -> None:
        """Erase those of ``nodes`` nothing reads any more, the latest first (so that a
        node read only by erased ones goes too)."""
        order = self._order()
        for n in sorted(dict.fromkeys(nodes), key=order.__getitem__, reverse=True):
            if not n.users:
                self.graph.erase_node(n)

    def _meta(self, node: fx.Node) -> None:
        _set_meta(node, self.fake_mode)

    def _new_seed(self, device) -> fx.Node:
        """A one-element int64 seed drawn from torch's generator (``torch.manual_seed``
        repeats a run), for a fused op that draws random numbers; insert it under
        ``graph.inserting_before``.  :meth:`merge_seeds` later draws all of a graph's in
        one call."""
        seed = self.graph.call_function(
            aten.randint.low, (0, 2**62, [1]), {"dtype": torch.int64, "device": device}
        )
        seed.meta[_SEED_META] = True
        self._meta(seed)
        return seed

    def merge_seeds(self) -> None:
        """Draw every seed of :meth:`_new_seed` in one ``randint`` (one launch, not one per
        dropout): each becomes a one-element slice of it (and an unused one goes)."""
        seeds = []
        for n in list(self.graph.nodes):
            if n.meta.get(_SEED_META):
                if n.users:
                    seeds.append(n)
                else:  # its fused op was not made: don't draw for nothing
                    self.graph.erase_node(n)
        by_device: dict[Any, list[fx.Node]] = {}
        for n in seeds:
            by_device.setdefault(n.kwargs["device"], []).append(n)
        for device, group in by_device.items():
            if len(group) < 2:
                continue
            with self.graph.inserting_before(group[0]):
                every = self.graph.call_function(
                    aten.randint.low,
                    (0, 2**62, [len(group)]),
                    {"dtype": torch.int64, "device": device},
                )
                self._meta(every)
                for i, n in enumerate(group):
                    part = self.graph.call_function(aten.slice.Tensor, (every, 0, i, i + 1))
                    self._meta(part)
                    n.replace_all_uses_with(part)
            for n in group:
                self.graph.erase_node(n)
