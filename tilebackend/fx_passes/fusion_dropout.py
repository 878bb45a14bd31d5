"""Dropouts written as pointwise ops, so that a dropout after a GEMM (GPT-2's and BERT's
residual dropouts in training) fuses into the GEMM's epilogue (see :mod:`.fusion`).

Before the matmul fusions, :meth:`DropoutLowering.lower_dropouts` rewrites each training
dropout in the form the graph has it:

- ``native_dropout(x, p, True)`` (no decompositions: the eager fallback) becomes
  ``keep = tile::dropout_keep(x, seed, p)``, ``out = x * keep * (1 / (1 - p))``, with a
  seed drawn from torch's generator (``aten.randint``, so ``torch.manual_seed`` repeats
  runs);
- Inductor's decomposition ``inductor_random(shape, seed, "rand") > p`` (for fp16 / bf16
  with the random numbers cast first) becomes ``tile::dropout_keep(x, seed, p)`` on its
  own seed (Inductor's numbers, drawn the same way, compared in fp32).

``keep`` is a pointwise op of :mod:`..codegen.pointwise` (``rand(seed) > p``), so the
epilogue pass absorbs it like any other; the mask the backward saves is written by the
same kernel.  After the matmul fusions, :meth:`DropoutLowering.restore_dropouts` puts the
original dropout back wherever the rewrite did not fuse: an unfused rewrite would cost
more launches than the dropout it replaced.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .fusion_core import _CASTS, FuserBase, _is_tensor_node, _val, aten


@dataclass
class _Lowered:
    form: str  # "native" or "inductor"
    p: float
    seed: fx.Node
    keep: fx.Node
    masked: fx.Node | None = None  # native: x * keep
    out: fx.Node | None = None  # native: x * keep * scale
    shape: list | None = None  # inductor: the random tensor's size argument
    cast: tuple | None = None  # inductor: (target, args after the input, kwargs) of its cast


def _inductor_random():
    prims = torch.ops.prims
    op = getattr(prims, "inductor_random", None)
    return getattr(op, "default", None)


class DropoutLowering(FuserBase):
    def lower_dropouts(self) -> None:
        """Rewrite each training dropout as ``tile::dropout_keep`` plus pointwise ops."""
        self._lowered: list[_Lowered] = []
        rand_op = _inductor_random()
        for n in list(self.graph.nodes):
            if n.op != "call_function":
                continue
            if n.target is aten.native_dropout.default:
                self._lower_native(n)
            elif rand_op is not None and n.target is rand_op:
                self._lower_inductor(n)

    def _lower_native(self, nd: fx.Node) -> None:
        x, p = nd.args[0], nd.args[1]
        train = nd.args[2] if len(nd.args) > 2 else nd.kwargs.get("train")
        if train is not True or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            return
        if not _is_tensor_node(x) or not _val(x).is_floating_point():
            return
        outs = {g.args[1]: g for g in nd.users if g.target is operator.getitem}
        if len(outs) != len(nd.users):
            return
        graph = self.graph
        with graph.inserting_before(nd):
            seed = self._new_seed(_val(x).device)
            keep = graph.call_function(torch.ops.tile.dropout_keep.default, (x, seed, float(p)))
            masked = graph.call_function(aten.mul.Tensor, (x, keep))
            out = graph.call_function(aten.mul.Tensor, (masked, 1.0 / (1.0 - float(p))))
            for new in (keep, masked, out):
                self._meta(new)
        if 0 in outs:
            outs[0].replace_all_uses_with(out)
        if 1 in outs:
            outs[1].replace_all_uses_with(keep)
        for g in outs.values():
            graph.erase_node(g)
        graph.erase_node(nd)
        self.touched = True
        self._lowered.append(_Lowered("native", float(p), seed, keep, masked, out))

    def _lower_inductor(self, rnd: fx.Node) -> None:
        shape, seed, mode = rnd.args[:3]
        if mode != "rand" or len(rnd.users) != 1:
            return
        (gt,) = rnd.users
        cast = None
        if gt.target in _CASTS and len(gt.users) == 1:  # fp16 / bf16: rand cast first
            cast, (gt,) = gt, gt.users
        if gt.target is not aten.gt.Scalar or gt.args[0] is not (cast or rnd):
            return
        p = gt.args[1]
        if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            return
        # the dropout's input: the other operand of ``mul(gt, x)``
        xs = [
            a
            for u in gt.users
            if u.target is aten.mul.Tensor and len(u.args) == 2 and gt in u.args
            for a in u.args
            if a is not gt
        ]
        if len(xs) != 1 or not _is_tensor_node(xs[0]):
            return
        x = xs[0]
        if not self._same(_val(x).shape, _val(rnd).shape):
            return
        order = self._order()
        first = min(gt.users, key=order.__getitem__)
        if order[x] > order[first] or order[seed] > order[first]:
            return
        with self.graph.inserting_before(first):
            keep = self.graph.call_function(
                torch.ops.tile.dropout_keep.default, (x, seed, float(p))
            )
            self._meta(keep)
        gt.replace_all_uses_with(keep)
        how = None if cast is None else (cast.target, cast.args[1:], dict(cast.kwargs))
        for n in (gt, cast, rnd):
            if n is not None:
                self.graph.erase_node(n)
        self.touched = True
        low = _Lowered("inductor", float(p), seed, keep, shape=list(shape), cast=how)
        self._lowered.append(low)

    def restore_dropouts(self) -> None:
        """Put back the original dropout wherever its keep mask was not fused (an unfused
        keep whose masked output was fused stays: its kernel draws the same numbers)."""
        alive = set(self.graph.nodes)
        graph = self.graph
        for low in getattr(self, "_lowered", []):
            if low.keep not in alive:
                continue
            if low.form == "inductor":
                with graph.inserting_before(low.keep):
                    rnd = graph.call_function(_inductor_random(), (low.shape, low.seed, "rand"))
                    self._meta(rnd)
                    if low.cast is not None:
                        target, rest, kwargs = low.cast
                        rnd = graph.call_function(target, (rnd, *rest), kwargs)
                        self._meta(rnd)
                    gt = graph.call_function(aten.gt.Scalar, (rnd, low.p))
                    self._meta(gt)
                low.keep.replace_all_uses_with(gt)
                graph.erase_node(low.keep)
                continue
            if low.masked not in alive or low.out not in alive:
                continue
            if set(low.masked.users) != {low.out}:
                continue
            x = low.keep.args[0]  # as the graph has it now (the epilogue pass may replace it)
            with graph.inserting_before(low.keep):
                nd = graph.call_function(aten.native_dropout.default, (x, low.p, True))
                self._meta(nd)
                g0 = graph.call_function(operator.getitem, (nd, 0))
                g1 = graph.call_function(operator.getitem, (nd, 1))
                self._meta(g0)
                self._meta(g1)
            low.out.replace_all_uses_with(g0)
            graph.erase_node(low.out)
            graph.erase_node(low.masked)
            low.keep.replace_all_uses_with(g1)
            graph.erase_node(low.keep)  # its seed, now unused, goes in merge_seeds
        self._lowered = []
