"""Fusion: grow each tile anchor into the pointwise ops around it, one kernel per region.

* **matmul epilogues** (not a fixed menu): from a ``tile::mm``/``tile::addmm`` (through the
  view a linear on N-d inputs adds), absorb every pointwise ATen op whose tensor inputs
  are in the region or are *extra inputs* that broadcast to the output; the region ends
  at one sink whose value leaves it.  An intermediate used outside the region must still
  be written, so it bounds the region.  The ops become one expression
  (``codegen.pointwise``) generated into ``tile::mm_epilogue``'s kernel.
* **dual GEMM epilogues**: two GEMMs of one ``a`` (same weight shape) whose results are
  used only by one pointwise region, like SwiGLU's ``silu(x @ W1) * (x @ W3)``, become
  ``tile::dual_mm_epilogue`` (one kernel, two accumulators: ``ACC`` and ``ACC1`` of the
  expression).  Tried first; when a result escapes the region (training graphs save both
  for the backward) the single-GEMM epilogue applies as before.
* **softmax prologues**: ``softmax(x * scale + mask)`` (and ``/ s``, ``masked_fill(mask,
  -inf)``) become ``tile::scale_mask_softmax``.
* **residual add + norm**: ``layer_norm(x + r)`` / ``rms_norm(x + r)`` become
  ``tile::add_layer_norm`` / ``tile::add_rms_norm``, which also write the sum when it is
  used later.

It runs on graphs whose autograd is already done (inference, and the partitioned forward
and backward graphs), after the anchors were replaced by the rewrite.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ..report import GraphReport, Replacement, Skipped, describe_value, short_target
from . import shapes
from .matcher import _fake_mode_of, _set_meta

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


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


class _Fuser:
    def __init__(self, gm: fx.GraphModule, report: GraphReport) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.report = report
        self.fake_mode = _fake_mode_of(gm)
        self.count = 0
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

    # --- matmul epilogue ---------------------------------------------------------------

    def _gemm_parts(self, node: fx.Node) -> tuple[Any, Any, Any] | None:
        """``(a, b, bias)`` of a ``tile::mm`` / ``tile::addmm`` with alpha == beta == 1
        (``bias`` None for mm), else None."""
        tile = torch.ops.tile
        if node.op != "call_function":
            return None
        if node.target is tile.mm.default:
            a, b = node.args[:2]
            return a, b, None
        if node.target is tile.addmm.default:
            bias, a, b = node.args[:3]
            beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
            alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
            if beta == 1 and alpha == 1:
                return a, b, bias
        return None

    def _gemm_root(self, gemm: fx.Node) -> fx.Node:
        """Where an epilogue grows from: the view back to N-d that a linear on N-d inputs
        adds (the GEMM's only user), else the GEMM itself."""
        if len(gemm.users) == 1:
            (u,) = gemm.users
            if u.target in _VIEWS and self.facts.prove_eq(_val(u).shape[-1], _val(gemm).shape[-1]):
                return u
        return gemm

    def matmul_epilogues(self) -> None:
        from ..codegen import fused_matmul, pointwise

        for gemm in list(self.graph.nodes):
            parts = self._gemm_parts(gemm)
            if parts is None:
                continue
            a, b, bias = parts
            root = self._gemm_root(gemm)
            region, sink, extras, why = self._grow([root], pointwise)
            if sink is None:
                if why:
                    self._note(gemm, why)
                continue
            try:
                expr, leaves = self._expression([root], region, sink, extras, pointwise)
            except pointwise.ExprError as e:
                self._note(gemm, f"epilogue not expressible: {e}")
                continue
            extra_nodes, why = self._extra_inputs(gemm, sink, leaves)
            if extra_nodes is None:
                self._note(gemm, why)
                continue
            hinted = [shapes.hinted(_val(x)) for x in (a, b, bias)]
            expr_s = pointwise.dumps(expr)
            reason = fused_matmul.check(*hinted, self._extra_values(extra_nodes), expr_s)
            if reason is not None:
                self._note(gemm, f"fused epilogue refused: {reason}")
                continue
            self._splice(
                torch.ops.tile.mm_epilogue.default,
                (a, b, bias, expr_s),
                [gemm],
                [root],
                region,
                sink,
                extra_nodes,
            )
            self.report.replacements.append(
                Replacement(
                    pattern="fused_mm_epilogue",
                    nodes=[gemm.name, *(n.name for n in region)],
                    targets=["mm", *[short_target(n.target) for n in region]],
                    inputs={"a": describe_value(_val(a)), "b": describe_value(_val(b))},
                    scalars={"expr": expr_s},
                )
            )

    def _grow(self, roots: list[fx.Node], pointwise):
        """Absorb pointwise users of the region grown from ``roots`` (one GEMM result, or
        the two of a dual GEMM); return (region, sink, extras, why).  Every user of every
        root must end up in the region."""
        region: list[fx.Node] = []
        inside = set(roots)
        downstream = set().union(*(_descendants(r) for r in roots))
        frontier = [u for r in roots for u in r.users]
        shape = _val(roots[0]).shape
        why = None
        while frontier:
            u = frontier.pop(0)
            if u in inside:
                continue
            if u.op != "call_function" or not pointwise.is_pointwise(u.target):
                why = why or f"{u.name} ({u.target}) is not pointwise"
                continue
            ins = [a for a in u.all_input_nodes]
            bad = None
            for a in ins:
                if a in inside:
                    continue
                if a in downstream:
                    bad = f"{u.name} needs {a.name}, computed from the region by other ops"
                    break
                if not _is_tensor_node(a):
                    bad = f"{u.name} reads a non-tensor value {a.name}"
                    break
            if bad:
                why = why or bad
                continue
            if not _is_tensor_node(u) or not self._same(_val(u).shape, shape):
                why = why or f"{u.name} changes the output's shape"
                continue
            region.append(u)
            inside.add(u)
            frontier.extend(u.users)
        if not region:
            return [], None, [], why
        order = self._order()
        region.sort(key=order.__getitem__)
        # the sink: the latest node whose ancestors in the region let nothing else escape
        for sink in reversed(region):
            members = self._ancestors_within(sink, set(region)) | {sink}
            closed = all(
                all(u in members for u in n.users) for n in members if n is not sink
            ) and all(u in members for r in roots for u in r.users)
            if closed:
                kept = [n for n in region if n in members]
                extras = [
                    a
                    for n in kept
                    for a in n.all_input_nodes
                    if a not in members and a not in roots
                ]
                return kept, sink, list(dict.fromkeys(extras)), why
        return [], None, [], why or "every candidate region has an intermediate used outside it"

    @staticmethod
    def _ancestors_within(node: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
        out: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a in allowed and a not in out:
                    out.add(a)
                    stack.append(a)
        return out

    def _expression(self, roots, region, sink, extras, pointwise):
        """The region as one expression over ``roots`` (``ACC``, and ``ACC1`` for a dual
        GEMM) and ``extras`` (``IN0``..); returns (expression, extras in ``INk`` order)."""
        env: dict[fx.Node, Any] = dict(zip(roots, ("ACC", "ACC1")))
        leaves: list[fx.Node] = []
        for e in extras:
            env[e] = f"IN{len(leaves)}"
            leaves.append(e)

        def conv(x):
            if isinstance(x, fx.Node):
                return env[x]
            if isinstance(x, (list, tuple)):
                return type(x)(conv(y) for y in x)
            return x

        for n in region:
            args = [conv(a) for a in n.args]
            kwargs = {k: conv(v) for k, v in n.kwargs.items()}
            env[n] = pointwise.from_aten(n.target, args, kwargs)
        return env[sink], leaves

    def _extra_inputs(self, gemm, sink, leaves):
        """How each extra reaches the fused op: ``(kind, node, shape)``, kind ``"as_is"`` or
        ``"view"`` (an N-d extra of the N-d output, viewed as the GEMM's ``[M, N]``).
        Returns (that list, None) or (None, why)."""
        out_shape = _val(sink).shape
        m_n = _val(gemm).shape
        extra_nodes = []
        for e in leaves:
            v = _val(e)
            if v.dim() > 2:
                if (
                    not self._same(v.shape, out_shape)
                    or self.facts.prove_contiguous(v.shape, v.stride()) is not True
                    or any(shapes.is_symbolic(d) for d in m_n)
                ):
                    return None, f"extra input {e.name} {tuple(v.shape)} is not 2-D"
                extra_nodes.append(("view", e, [m_n[0], m_n[1]]))
            else:
                extra_nodes.append(("as_is", e, None))
        return extra_nodes, None

    @staticmethod
    def _extra_values(extra_nodes) -> list[Any]:
        """The extras' (hinted) values as the fused op's check sees them."""
        vals = []
        for kind, e, shape in extra_nodes:
            v = shapes.hinted(_val(e))
            vals.append(_Reshaped(v, shape) if kind == "view" else v)
        return vals

    def _splice(self, op, args, gemms, roots, region, sink, extra_nodes, also=()) -> None:
        """Insert ``op(*args[:-1], extras, args[-1])`` (the extras go before the expression)
        for the region, viewed back to N-d when the first root is a view, and erase what it
        replaces (``also``: more nodes that may be dead now)."""
        graph = self.graph
        with graph.inserting_before(sink):
            extras = []
            for kind, e, shape in extra_nodes:
                if kind == "view":
                    v = graph.call_function(aten.view.default, (e, shape))
                    self._meta(v)
                    extras.append(v)
                else:
                    extras.append(e)
            fused = graph.call_function(op, (*args[:-1], extras, args[-1]))
            self._meta(fused)
            out = fused
            if roots[0] is not gemms[0]:
                out = graph.call_function(aten.view.default, (fused, list(roots[0].args[1])))
                self._meta(out)
        sink.replace_all_uses_with(out)
        dead = dict.fromkeys([*region, *roots, *gemms, *also])  # a root is its gemm w/o view
        for n in sorted(dead, key=self._order().__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
        self.count += 1

    # --- dual GEMM epilogue ------------------------------------------------------------

    def dual_matmul_epilogues(self) -> None:
        """Two GEMMs of one ``a`` whose results are used only by one pointwise region
        (SwiGLU's ``silu(x @ W1) * (x @ W3)``) become one ``tile::dual_mm_epilogue``: one
        kernel loads each A tile once for both accumulators.  Runs before
        :meth:`matmul_epilogues`, which would fuse the region into one GEMM only."""
        from ..codegen import pointwise

        gemms = [(n, p) for n in self.graph.nodes if (p := self._gemm_parts(n)) is not None]
        taken: set[fx.Node] = set()
        for i, (g0, p0) in enumerate(gemms):
            for g1, p1 in gemms[i + 1 :]:
                if g0 in taken:
                    break
                if g1 in taken or not self._same_input(p0[0], p1[0]):
                    continue
                roots = [self._gemm_root(g0), self._gemm_root(g1)]
                if not self._meet_in_pointwise(roots, pointwise):
                    continue  # not a pair: no pointwise op reads both results
                why = self._fuse_dual(g0, g1, p0, p1, roots, pointwise)
                if why is None:
                    taken.update((g0, g1))
                else:
                    self._note(g0, f"dual GEMM with {g1.name} not fused: {why}")

    def _same_input(self, a0: Any, a1: Any) -> bool:
        """``a0`` and ``a1`` are one value: one node, or two views of one node, both
        reshapes to one shape or one view op with the same arguments (the graphs are not
        CSE'd: each linear on N-d inputs adds its own view of ``x``, each ``x.t()`` its
        own ``t``)."""
        if a0 is a1:
            return True
        if not (
            isinstance(a0, fx.Node)
            and isinstance(a1, fx.Node)
            and a0.op == a1.op == "call_function"
            and a0.args
            and a1.args
            and a0.args[0] is a1.args[0]
        ):
            return False
        if a0.target in _VIEWS and a1.target in _VIEWS:
            return self._same(_val(a0).shape, _val(a1).shape)
        return (
            a0.target is a1.target
            and getattr(a0.target, "is_view", False)
            and a0.args == a1.args
            and a0.kwargs == a1.kwargs
        )

    @staticmethod
    def _meet_in_pointwise(roots: list[fx.Node], pointwise) -> bool:
        """Some op is reached from both roots through pointwise ops only."""

        def reach(root: fx.Node) -> set[fx.Node]:
            seen: set[fx.Node] = set()
            stack = list(root.users)
            while stack:
                n = stack.pop()
                if n in seen or n.op != "call_function" or not pointwise.is_pointwise(n.target):
                    continue
                seen.add(n)
                stack.extend(n.users)
            return seen

        return bool(reach(roots[0]) & reach(roots[1]))

    def _fuse_dual(self, g0, g1, p0, p1, roots, pointwise) -> str | None:
        """Fuse the pair into one ``tile::dual_mm_epilogue``; None, or why it was not."""
        from ..codegen import dual_matmul

        (a0, b0, bias0), (a1, b1, bias1) = p0, p1
        vb0, vb1 = _val(b0), _val(b1)
        if vb0.dtype != vb1.dtype or not self._same(vb0.shape, vb1.shape):
            return f"the weights {describe_value(vb0)} and {describe_value(vb1)} differ"
        if not self._same(_val(roots[0]).shape, _val(roots[1]).shape):
            return "the GEMM results have different shapes"
        region, sink, extras, why = self._grow(roots, pointwise)
        if sink is None:
            return why or "no pointwise region reads both results"
        try:
            expr, leaves = self._expression(roots, region, sink, extras, pointwise)
        except pointwise.ExprError as e:
            return f"epilogue not expressible: {e}"
        extra_nodes, why = self._extra_inputs(g0, sink, leaves)
        if extra_nodes is None:
            return why
        expr_s = pointwise.dumps(expr)
        hinted = [shapes.hinted(_val(x)) for x in (a0, b0, b1, bias0, bias1)]
        reason = dual_matmul.check(*hinted, self._extra_values(extra_nodes), expr_s)
        if reason is not None:
            return f"fused dual epilogue refused: {reason}"
        self._splice(
            torch.ops.tile.dual_mm_epilogue.default,
            (a0, b0, b1, bias0, bias1, expr_s),
            [g0, g1],
            roots,
            region,
            sink,
            extra_nodes,
            also=[a1] if a1 is not a0 else [],  # the second view of a, now unused
        )
        self.report.replacements.append(
            Replacement(
                pattern="fused_dual_mm_epilogue",
                nodes=[g0.name, g1.name, *(n.name for n in region)],
                targets=[
                    *("mm" if p[2] is None else "addmm" for p in (p0, p1)),
                    *(short_target(n.target) for n in region),
                ],
                inputs={
                    "a": describe_value(_val(a0)),
                    "b0": describe_value(vb0),
                    "b1": describe_value(vb1),
                },
                scalars={"expr": expr_s},
            )
        )
        return None

    def _meta(self, node: fx.Node) -> None:
        _set_meta(node, self.fake_mode)

    # --- softmax prologue --------------------------------------------------------------

    def softmax_prologues(self) -> None:
        tile = torch.ops.tile
        for sm in list(self.graph.nodes):
            if sm.op != "call_function" or sm.target is not tile.softmax.default:
                continue
            x, dim, half_to_float = sm.args[:3]
            if half_to_float:
                continue
            scale, mask, mode, base, consumed = 1.0, None, None, x, []
            # x may be: add(s, mask) | masked_fill(s, mask, -inf) | s ; s = mul(y, c) | div(y, c)
            if (
                _single_use(base)
                and base.target is aten.add.Tensor
                and _is_tensor_node(base.args[1])
                and base.kwargs.get("alpha", 1) == 1
            ):
                mask, mode = base.args[1], "add"
                consumed.append(base)
                base = base.args[0]
            elif (
                _single_use(base)
                and base.target is aten.masked_fill.Scalar
                and base.args[2] == -math.inf
            ):
                mask, mode = base.args[1], "fill"
                consumed.append(base)
                base = base.args[0]
            if (
                _single_use(base)
                and base.target in (aten.mul.Tensor, aten.div.Tensor)
                and isinstance(base.args[1], (int, float))
                and not isinstance(base.args[1], bool)
                and base.args[1] != 0
            ):
                c = float(base.args[1])
                scale = c if base.target is aten.mul.Tensor else 1.0 / c
                consumed.append(base)
                base = base.args[0]
            if not consumed:
                continue
            xv = _val(base)
            if mask is not None:
                mv = _val(mask)
                if mode == "add" and mv.dtype != xv.dtype:
                    continue
                if not self._broadcasts_to(mv.shape, xv.shape):
                    continue
                if mode == "fill" and mv.dtype != torch.bool:
                    continue
            if not isinstance(dim, int) or dim % xv.dim() != xv.dim() - 1:
                continue
            with self.graph.inserting_before(sm):
                fused = self.graph.call_function(
                    tile.scale_mask_softmax.default, (base, scale, mask, -1)
                )
                self._meta(fused)
            if (
                not self._same(_val(fused).shape, _val(sm).shape)
                or _val(fused).dtype != _val(sm).dtype
            ):
                self.graph.erase_node(fused)
                continue
            sm.replace_all_uses_with(fused)
            for n in [sm, *consumed]:
                if not n.users:
                    self.graph.erase_node(n)
            self.count += 1
            self.report.replacements.append(
                Replacement(
                    pattern="fused_scale_mask_softmax",
                    nodes=[n.name for n in (*reversed(consumed), sm)],
                    targets=[short_target(n.target) for n in (*reversed(consumed), sm)],
                    inputs={"x": describe_value(xv)}
                    | ({"mask": describe_value(_val(mask))} if mask is not None else {}),
                    scalars={"scale": scale, "mask_mode": mode or "none"},
                )
            )

    # --- dropout after a softmax ------------------------------------------------------

    def softmax_dropouts(self) -> None:
        """``dropout(softmax(...))`` -> ``tile::scale_mask_softmax_dropout``, in both forms
        a graph has it: ``aten.native_dropout`` (no decompositions: the eager fallback) and
        Inductor's decomposition ``mul(mul(inductor_random(...) > p, s), 1 / (1 - p))``,
        whose seed node the fused op reads, so the random draws follow Inductor's seeding.
        The probabilities and the keep mask are written only when the backward saves them.
        """
        tile = torch.ops.tile
        for sm in list(self.graph.nodes):
            if sm.op != "call_function":
                continue
            if sm.target is tile.scale_mask_softmax.default:
                x, scale, mask, dim = sm.args[:4]
            elif sm.target is tile.softmax.default and sm.args[2] is False:
                (x, dim), scale, mask = sm.args[:2], 1.0, None
            else:
                continue
            for u in list(sm.users):
                found = self._dropout_after(sm, u)
                if found is None:
                    continue
                if isinstance(found, str):
                    self._note(sm, found)
                    continue
                self._splice_dropout(sm, x, scale, mask, dim, *found)
                break

    def _dropout_after(self, sm: fx.Node, u: fx.Node):
        """``(p, drop_scale, seed, out, keeps, chain)`` for a dropout of ``sm`` at user
        ``u``, a reason string when it is one that cannot fuse, None when ``u`` is none."""
        if u.target is aten.native_dropout.default:
            p, train = u.args[1], u.args[2] if len(u.args) > 2 else u.kwargs.get("train")
            if train is not True:
                return None
            if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
                return f"dropout {u.name}: p={p!r} is not in (0, 1)"
            outs = {g.args[1]: g for g in u.users if g.target is operator.getitem}
            if len(outs) != len(u.users) or 0 not in outs:
                return f"dropout {u.name}: its outputs are used whole"
            keeps = list(outs[1].users) if 1 in outs else []
            chain = [*outs.values(), u]  # users first: erased in this order
            return float(p), 1.0 / (1.0 - float(p)), None, outs[0], keeps, chain
        if u.target is not aten.mul.Tensor or len(u.args) != 2:
            return None
        gt = u.args[0] if u.args[1] is sm else u.args[1]
        if not (isinstance(gt, fx.Node) and gt.target is aten.gt.Scalar):
            return None
        rnd, p = gt.args
        if not (
            isinstance(rnd, fx.Node)
            and rnd.target is torch.ops.prims.inductor_random.default
            and rnd.args[2] == "rand"
            and len(rnd.users) == 1
        ):
            return None
        if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            return f"dropout {gt.name}: p={p!r} is not in (0, 1)"
        (out,) = u.users if len(u.users) == 1 else (None,)
        if out is None or out.target is not aten.mul.Tensor or out.args[0] is not u:
            return f"dropout {u.name}: not followed by its 1 / (1 - p) scale"
        c = out.args[1]
        if not isinstance(c, float) or not math.isclose(c, 1.0 / (1.0 - p), rel_tol=1e-6):
            return f"dropout {u.name}: scale {c!r} is not 1 / (1 - p)"
        if not self._same(_val(rnd).shape, _val(sm).shape):
            return f"dropout {u.name}: the random tensor's shape differs from the softmax's"
        keeps = [k for k in gt.users if k is not u]
        return float(p), c, rnd.args[1], out, keeps, [out, u, gt, rnd]

    def _splice_dropout(self, sm, x, scale, mask, dim, p, drop_scale, seed, out, keeps, chain):
        from ..codegen import fused_softmax

        graph = self.graph
        others = [u for u in sm.users if u not in chain]
        if seed is None:  # native_dropout: draw a seed from torch's generator
            with graph.inserting_before(sm):
                seed = graph.call_function(
                    aten.randint.low,
                    (0, 2**62, [1]),
                    {"dtype": torch.int64, "device": _val(sm).device},
                )
                self._meta(seed)
        else:  # Inductor's seed lookup: make it available where the softmax is
            order = self._order()
            for n in [*seed.all_input_nodes, seed]:
                if order[n] > order[sm]:
                    sm.prepend(n)
        hinted = [shapes.hinted(_val(v)) if isinstance(v, fx.Node) else v for v in (x, mask)]
        reason = fused_softmax.check_dropout(
            hinted[0], hinted[1], dim, p, shapes.hinted(_val(seed))
        )
        if reason:
            self._note(sm, f"dropout not fused: {reason}")
            return
        args = (x, scale, mask, dim, p, seed, bool(others), bool(keeps), drop_scale)
        with graph.inserting_before(sm):
            fused = graph.call_function(torch.ops.tile.scale_mask_softmax_dropout.default, args)
            self._meta(fused)
            parts = []
            for i in range(3):
                g = graph.call_function(operator.getitem, (fused, i))
                self._meta(g)
                parts.append(g)
        out.replace_all_uses_with(parts[0])
        for u in others:
            u.replace_input_with(sm, parts[1])
        for k in keeps:
            for a in k.all_input_nodes:
                if a in chain:
                    k.replace_input_with(a, parts[2])
        for n in [*chain, sm]:
            if not n.users:
                graph.erase_node(n)
        for g in parts[1:]:
            if not g.users:
                graph.erase_node(g)
        self.count += 1
        self.report.replacements.append(
            Replacement(
                pattern="fused_softmax_dropout",
                nodes=[sm.name, *[n.name for n in reversed(chain)]],
                targets=[
                    short_target(n.target)
                    for n in (sm, *reversed(chain))
                    if n.target is not operator.getitem
                ],
                inputs={"x": describe_value(_val(x))}
                | ({"mask": describe_value(_val(mask))} if mask is not None else {}),
                scalars={
                    "p": p,
                    "scale": scale,
                    "writes_probs": bool(others),
                    "writes_keep": bool(keeps),
                },
            )
        )

    def softmax_backwards(self) -> None:
        """In backward graphs, ``tile::softmax_backward`` absorbs the dropout backward
        before it (``native_dropout_backward(g, keep, c)`` or ``mul(mul(g, c), keep)``) and
        the softmax prologue's scale after it (``mul(dx, scale)``):
        ``tile::scale_mask_softmax_backward`` reads ``g``, ``keep`` and the probabilities
        once and writes ``dx`` once."""
        tile = torch.ops.tile
        for sb in list(self.graph.nodes):
            if sb.op != "call_function" or sb.target is not tile.softmax_backward.default:
                continue
            grad, out, dim, in_dtype = sb.args[:4]
            vg, vo = _val(grad), _val(out)
            if not (_is_tensor_node(grad) and vg.dtype == vo.dtype == in_dtype):
                continue
            consumed: list[fx.Node] = []
            g, keep, drop_scale = grad, None, 1.0
            if _single_use(grad) and grad.target is aten.native_dropout_backward.default:
                g, keep, drop_scale = grad.args[:3]
                consumed.append(grad)
            elif _single_use(grad) and grad.target is aten.mul.Tensor:
                a, b = grad.args[:2]
                k = next(
                    (t for t in (a, b) if _is_tensor_node(t) and _val(t).dtype == torch.bool), None
                )
                m = b if k is a else a
                if (
                    k is not None
                    and _single_use(m)
                    and m.target is aten.mul.Tensor
                    and _is_tensor_node(m.args[0])
                    and isinstance(m.args[1], float)
                ):
                    g, keep, drop_scale = m.args[0], k, m.args[1]
                    consumed += [grad, m]
            if keep is not None and not (
                self._same(_val(keep).shape, vg.shape)
                and self._same(_val(g).shape, vg.shape)
                and _val(g).dtype == vg.dtype
                and _val(keep).dtype == torch.bool
                and isinstance(drop_scale, float)
            ):
                g, keep, drop_scale, consumed = grad, None, 1.0, []
            scale, tail = 1.0, None
            if len(sb.users) == 1:
                (u,) = sb.users
                c = u.args[1] if u.target is aten.mul.Tensor and len(u.args) == 2 else None
                if u.args[0] is sb and isinstance(c, (int, float)) and not isinstance(c, bool):
                    scale, tail = float(c), u
            if keep is None and tail is None:
                continue
            with self.graph.inserting_before(sb):
                fused = self.graph.call_function(
                    tile.scale_mask_softmax_backward.default,
                    (g, out, scale, dim, in_dtype, False, keep, float(drop_scale)),
                )
                self._meta(fused)
            (tail or sb).replace_all_uses_with(fused)
            for n in [tail, sb, *consumed]:
                if n is not None and not n.users:
                    self.graph.erase_node(n)
            self.count += 1
            names = [n for n in (*reversed(consumed), sb, tail) if n is not None]
            self.report.replacements.append(
                Replacement(
                    pattern="fused_softmax_backward",
                    nodes=[n.name for n in names],
                    targets=[short_target(n.target) for n in names],
                    inputs={"grad": describe_value(vg), "out": describe_value(vo)},
                    scalars={"scale": scale, "dropout": keep is not None},
                )
            )

    # --- residual add + norm -----------------------------------------------------------

    def residual_norms(self) -> None:
        tile = torch.ops.tile
        for norm in list(self.graph.nodes):
            if norm.op != "call_function":
                continue
            if norm.target is tile.layer_norm.default:
                fused_op, remap = tile.add_layer_norm.default, {0: 0, 1: 2, 2: 3}
            elif norm.target is tile.rms_norm.default:
                fused_op, remap = tile.add_rms_norm.default, {0: 0, 1: 2}
            else:
                continue
            s = norm.args[0]
            if not (isinstance(s, fx.Node) and s.target is aten.add.Tensor and len(s.args) == 2):
                continue
            x, r = s.args
            if not (_is_tensor_node(x) and _is_tensor_node(r)) or s.kwargs.get("alpha", 1) != 1:
                continue
            vx, vr, vs = _val(x), _val(r), _val(s)
            if not (
                self._same(vx.shape, vr.shape)
                and self._same(vx.shape, vs.shape)
                and vx.dtype == vr.dtype == vs.dtype
            ):
                continue
            order = self._order()
            params = [a for a in norm.all_input_nodes if a is not s]
            # the sum may be read before the norm: compute both where the add was
            at = s if all(order[p] < order[s] for p in params) else norm
            if at is norm and any(order[u] < order[norm] for u in s.users if u is not norm):
                self._note(norm, f"{s.name} is read before the norm's parameters exist")
                continue
            with self.graph.inserting_before(at):
                fused = self.graph.call_function(fused_op, (x, r, *norm.args[1:]), norm.kwargs)
                self._meta(fused)
                total = self.graph.call_function(operator.getitem, (fused, 1))
                self._meta(total)
            stats_differ = any(
                u.target is operator.getitem
                and u.args[1] > 0
                and _val(u).dtype != _val(fused)[remap[u.args[1]]].dtype
                for u in norm.users
            )
            if stats_differ:  # e.g. CPU bf16 stats: keep the unfused norm's exact outputs
                self.graph.erase_node(total)
                self.graph.erase_node(fused)
                continue
            for u in list(norm.users):
                if u.target is operator.getitem:
                    with self.graph.inserting_before(u):
                        g = self.graph.call_function(operator.getitem, (fused, remap[u.args[1]]))
                        self._meta(g)
                    u.replace_all_uses_with(g)
                    self.graph.erase_node(u)
            if norm.users:
                raise RuntimeError(f"unexpected users of {norm.name}")
            self.graph.erase_node(norm)
            s.replace_all_uses_with(total)
            self.graph.erase_node(s)
            if not total.users:
                self.graph.erase_node(total)
            self.count += 1
            self.report.replacements.append(
                Replacement(
                    pattern=f"fused_add_{'layer' if 'layer' in str(fused_op) else 'rms'}_norm",
                    nodes=[s.name, norm.name],
                    targets=["add.Tensor", short_target(norm.target)],
                    inputs={"x": describe_value(vx), "residual": describe_value(vr)},
                    scalars={},
                )
            )


class _Reshaped:
    """A hinted tensor seen through a 2-D view (for the fused matmul's check)."""

    def __init__(self, t: Any, shape: list[int]) -> None:
        self._t = t
        self.shape = torch.Size(int(shapes.hint(s)) for s in shape)
        self.dtype, self.device = t.dtype, t.device
        self._stride = (self.shape[1], 1)

    def dim(self) -> int:
        return 2

    def stride(self, d: int | None = None):
        return self._stride if d is None else self._stride[d]

    def numel(self) -> int:
        return math.prod(self.shape)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def _single_use(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and len(n.users) == 1


def fuse(gm: fx.GraphModule, report: GraphReport) -> int:
    """Run every fusion on ``gm`` in place; return how many regions were fused."""
    from ..codegen import dual_matmul, fused_matmul, fused_norm, fused_softmax  # noqa: F401

    f = _Fuser(gm, report)
    f.residual_norms()
    f.softmax_prologues()
    f.softmax_dropouts()
    f.softmax_backwards()
    f.dual_matmul_epilogues()  # first: a SwiGLU pair wins over one GEMM's epilogue
    f.matmul_epilogues()
    if f.count:
        gm.graph.lint()
        gm.recompile()
    return f.count
