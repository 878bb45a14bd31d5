"""Matmul fusions (see :mod:`.fusion`): a GEMM's pointwise epilogue generated into its
kernel, and two GEMMs of one input with their shared epilogue as one dual-GEMM kernel."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ..codegen import pointwise_aten
from ..report import Replacement, describe_value, short_target
from . import shapes
from .fusion_core import (
    _SEED_META,
    _VIEWS,
    FuserBase,
    _descendants,
    _is_tensor_node,
    _val,
    aten,
)


class MatmulFusions(FuserBase):
    # --- matmul epilogue ---------------------------------------------------------------

    def _gemm_parts(self, node: fx.Node, batched: bool = False) -> tuple[Any, Any, Any] | None:
        """``(a, b, bias)`` of a ``tile::mm`` / ``tile::addmm`` with alpha == beta == 1
        (``bias`` None for mm), and with ``batched`` of a ``tile::bmm`` (``b`` is 3-D),
        else None."""
        tile = torch.ops.tile
        if node.op != "call_function":
            return None
        if node.target is tile.mm.default or (batched and node.target is tile.bmm.default):
            a, b = node.args[:2]
            return a, b, None
        if node.target is tile.addmm.default:
            bias, a, b = node.args[:3]
            beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
            alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
            if beta == 1 and alpha == 1:
                return a, b, bias
        return None

    def _note_unfusable(self, node: fx.Node) -> None:
        """Say why a GEMM with pointwise users is no epilogue anchor (else nothing would)."""
        tile = torch.ops.tile
        users = [w for u in node.users for w in (u.users if u.target in _VIEWS else [u])]
        if node.op != "call_function" or not any(
            u.op == "call_function" and pointwise_aten.is_pointwise(u.target) for u in users
        ):
            return
        if node.target is tile.baddbmm.default:
            self._note(
                node,
                "a baddbmm takes no epilogue (a bmm does): its pointwise users run as "
                "their own ops",
            )
        elif node.target is tile.addmm.default:
            self._note(node, "an addmm with alpha or beta other than 1 takes no epilogue")

    def _gemm_root(self, gemm: fx.Node) -> fx.Node:
        """Where an epilogue grows from: the view back to N-d that a linear on N-d inputs
        adds (the GEMM's only user), else the GEMM itself."""
        if len(gemm.users) == 1:
            (u,) = gemm.users
            if u.target in _VIEWS and self.facts.prove_eq(_val(u).shape[-1], _val(gemm).shape[-1]):
                return u
        return gemm

    def matmul_epilogues(self) -> None:
        """Fuse each GEMM's closed epilogue region (``tile::mm_epilogue``); then, for the
        GEMMs left without one (a training forward saves intermediates for the backward),
        the region that also writes the values used elsewhere (``tile::mm_epilogue_multi``,
        :meth:`_fuse_open`)."""
        from ..codegen import pointwise

        open_candidates = []
        for gemm in list(self.graph.nodes):
            parts = self._gemm_parts(gemm, batched=True)
            if parts is None:
                self._note_unfusable(gemm)
                continue
            root = self._gemm_root(gemm)
            grown, why = self._grow_region([root], pointwise)
            region, sink, extras, why = self._closed([root], grown, why)
            if sink is None:
                open_candidates.append((gemm, root if region else None, why, False))
                continue
            if len(grown) > len(region):  # pointwise ops read a value the closed region
                # writes (a training forward saves the GELU's input): the open region
                # writes that value and computes them too, rather than leave them a pass
                open_candidates.append((gemm, root, None, True))
                continue
            self._fuse_closed(gemm, parts, root, region, sink, extras)
        for gemm, root, why, closed_too in open_candidates:
            # (read again: an earlier open fusion replaced the values it wrote, which a
            # later GEMM may read, as an MLP's second linear reads the first's GELU)
            parts = self._gemm_parts(gemm, batched=True)
            root = root or self._view_root(gemm)
            if root is not None and parts is not None:
                why = self._fuse_open(gemm, parts, root, pointwise)
                if why and closed_too:  # the closed region, then
                    region, sink, extras, _ = self._grow([root], pointwise)
                    if sink is not None:
                        self._fuse_closed(gemm, parts, root, region, sink, extras)
                        continue
            if why:
                self._note(gemm, why)
        self._drop_unused()

    def _fuse_closed(self, gemm, parts, root, region, sink, extras) -> None:
        """Fuse the closed ``region`` into ``gemm`` as one ``tile::mm_epilogue`` (or, when
        extras are GEMMs the region adds to the accumulator, ``tile::mm_sum_epilogue``
        with them as terms), or note why not."""
        from ..codegen import fused_matmul, fused_matmul_sum, pointwise

        a, b, bias = parts
        region = self._absorb_producers([root], region)
        extras = self._leaves([root], region)
        try:
            expr, leaves = self._expression([root], region, sink, extras, pointwise)
        except pointwise.ExprError as e:
            self._note(gemm, f"epilogue not expressible: {e}")
            return
        extra_nodes, why, a = self._extra_inputs(gemm, sink, leaves, a, root)
        if extra_nodes is None:
            self._note(gemm, why)
            return
        expr, extra_nodes, terms = pointwise.canonical(expr), extra_nodes, []
        if not self._batched(gemm):
            expr, extra_nodes, terms = self._gemm_terms(gemm, sink, expr, extra_nodes)
        if expr == "ACC" and not terms and not extra_nodes:  # copies only (an eval-mode
            # dropout's clone): the GEMM's result, read by nothing else, is fresh already
            if _val(sink).dtype == _val(root).dtype and self._same(
                _val(sink).shape, _val(root).shape
            ):
                sink.replace_all_uses_with(root)
                self._erase_unused(region)
                self.touched = True
            return
        hinted = [shapes.hinted(_val(x)) for x in (a, b, bias)]
        expr_s = pointwise.dumps(expr)
        ex_vals = self._extra_values(extra_nodes)
        if terms:
            t_as, t_bs = [g.args[0] for g, _ in terms], [g.args[1] for g, _ in terms]
            op, args = torch.ops.tile.mm_sum_epilogue.default, (a, b, bias, t_as, t_bs, expr_s)
            t_vals = [[shapes.hinted(_val(x)) for x in xs] for xs in (t_as, t_bs)]
            reason = fused_matmul_sum.check(*hinted, *t_vals, ex_vals, expr_s)
            what = "sum of GEMMs"
        else:
            op, args = torch.ops.tile.mm_epilogue.default, (a, b, bias, expr_s)
            reason = fused_matmul.check(*hinted, ex_vals, expr_s)
            what = "fused epilogue"
        if reason is not None:
            self._note(gemm, f"{what} refused: {reason}")
            return
        got = pointwise.infer_dtype(expr, fused_matmul._leaf_dtypes(hinted[0], ex_vals))
        if got != _val(sink).dtype:  # never a silently different result dtype
            self._note(gemm, f"{sink.name}'s dtype {_val(sink).dtype} is not its expression's")
            return
        also = [n for g, chain in terms for n in (*chain, g)]  # the terms' GEMMs and views
        also += [parts[0]] if parts[0] is not a else []  # (a's view, when a is N-d)
        self._splice(op, args, [gemm], [root], region, sink, extra_nodes, also=also)
        kind = "bmm" if self._batched(gemm) else "mm"
        self.report.replacements.append(
            Replacement(
                pattern="fused_mm_sum_epilogue" if terms else f"fused_{kind}_epilogue",
                nodes=[gemm.name, *(g.name for g, _ in terms), *(n.name for n in region)],
                targets=[kind, *("mm" for _ in terms), *[short_target(n.target) for n in region]],
                inputs={"a": describe_value(_val(a)), "b": describe_value(_val(b))},
                scalars={"expr": expr_s, **({"terms": len(terms)} if terms else {})},
            )
        )

    # --- a sum of GEMMs (see :mod:`.fusion_sum`) -------------------------------------------

    def _term_gemm(self, e: fx.Node, sink: fx.Node):
        """``(gemm, chain)`` when extra ``e`` is a plain ``tile::mm`` result of the output's
        shape reached through views that nothing else reads, else None."""
        out = _val(sink)  # (an extra broadcasts to it: a full-size view of a GEMM is it)
        chain, n = [], e
        while n.target in _VIEWS and len(n.users) == 1 and isinstance(n.args[0], fx.Node):
            chain.append(n)
            n = n.args[0]
        if n.target is not torch.ops.tile.mm.default or len(n.users) != 1:
            return None
        vt, va = _val(n), _val(n.args[0])
        if vt is None or va is None or vt.dim() != 2 or va.dim() != 2:
            return None
        if not self._same(vt.shape, (math.prod(out.shape[:-1]), out.shape[-1])):
            return None
        return n, chain

    def _gemm_terms(self, gemm, sink, expr, extra_nodes):
        """``(expr, extra_nodes, terms)``: the extras that are GEMMs added straight to the
        accumulator become terms ``(gemm, chain)``; the rest keep their order, renumbered."""
        from ..codegen import fused_matmul_sum
        from .fusion_sum import absorb, renumber

        found = {}
        for i, (_, e, _) in enumerate(extra_nodes):
            if _val(e).dtype == _val(gemm).dtype and (t := self._term_gemm(e, sink)) is not None:
                found[i] = t
        if not found:
            return expr, extra_nodes, []
        expr, taken = absorb(expr, set(found), fused_matmul_sum.MAX_TERMS)
        if not taken:
            return expr, extra_nodes, []
        kept = [i for i in range(len(extra_nodes)) if i not in taken]
        expr = renumber(expr, {old: new for new, old in enumerate(kept)})
        return expr, [extra_nodes[i] for i in kept], [found[i] for i in taken]

    def _grow(self, roots: list[fx.Node], pointwise):
        """Absorb pointwise users of the region grown from ``roots`` (one GEMM result, or
        the two of a dual GEMM); return (region, sink, extras, why).  Every user of every
        root must end up in the region.  When no closed region exists, ``sink`` is None and
        ``region`` is every pointwise node grown (empty when there was none)."""
        return self._closed(roots, *self._grow_region(roots, pointwise))

    def _closed(self, roots: list[fx.Node], region: list[fx.Node], why: str | None):
        """:meth:`_grow` of the grown ``region`` (and why growing stopped)."""
        if not region:
            return [], None, [], why
        # the sink: the latest node whose ancestors in the region let nothing else escape
        for sink in reversed(region):
            members = self._ancestors_within(sink, set(region)) | {sink}
            closed = all(
                all(u in members for u in n.users) for n in members if n is not sink
            ) and all(u in members for r in roots for u in r.users)
            if closed:
                kept = [n for n in region if n in members]
                return kept, sink, self._leaves(roots, kept), why
        return region, None, [], why or "every candidate region has an intermediate used outside it"

    #: the most extra inputs a region may read after it took in their producers
    MAX_ABSORBED_LEAVES = 8

    def _absorb_producers(self, roots: list[fx.Node], kept: list[fx.Node]) -> list[fx.Node]:
        """``kept`` with the pointwise ops that compute its extra inputs from others and
        are read by nothing else (a GELU's backward ``3 * x ** 2`` of the saved ``x``): the
        kernel computes them from their own inputs, and their result is never written.
        One is taken while the extras grow by at most one (and stay within
        :attr:`MAX_ABSORBED_LEAVES`); none that draws random numbers (a dropout's keep
        mask of a broadcast input is one draw per element of that input)."""
        from ..codegen import pointwise
        from .cse import draws_random

        inside = set(kept)  # (not the roots: a GEMM's own operand is no producer to take)
        changed = True
        while changed:
            changed = False
            leaves = self._leaves(roots, kept)
            for e in leaves:
                if (
                    e.op != "call_function"
                    or not pointwise_aten.is_pointwise(e.target)
                    or draws_random(e.target)
                    or not e.users
                    or any(u not in inside for u in e.users)
                    or not _is_tensor_node(e)
                    or not all(_is_tensor_node(x) for x in e.all_input_nodes)
                ):
                    continue
                grown = self._leaves(roots, [e, *kept])
                if len(grown) > min(len(leaves) + 1, self.MAX_ABSORBED_LEAVES):
                    continue
                expr = self._printed(e)
                if expr is None:  # (it stays an input)
                    continue
                if pointwise.seed_leaves(expr):  # a dropout's keep mask: drawn per element
                    continue  # of the output, it would not be the mask of a broadcast input
                kept = [e, *kept]
                inside.add(e)
                changed = True
                break
        order = self._order()
        return sorted(kept, key=order.__getitem__)

    @staticmethod
    def _leaves(roots, kept) -> list[fx.Node]:
        """The region's inputs other than the roots, in first-use order."""
        extras = [a for n in kept for a in n.all_input_nodes if a not in kept and a not in roots]
        return list(dict.fromkeys(extras))

    def _grow_region(self, roots: list[fx.Node], pointwise):
        """Every pointwise node reachable from ``roots`` whose other inputs are not computed
        from them by other ops, with the shape of the roots, in graph order; and why
        growing stopped somewhere (or None)."""
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
            if u.op != "call_function" or not pointwise_aten.is_pointwise(u.target):
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
        order = self._order()
        region.sort(key=order.__getitem__)
        return region, why

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

    def _printed(self, n: fx.Node) -> Any:
        """``n`` as :meth:`_expressions` prints it, each tensor input as the leaf ``IN0``;
        None when it cannot."""
        from ..codegen import pointwise

        def conv(x):
            if isinstance(x, fx.Node):
                return "IN0"
            if isinstance(x, (list, tuple)):
                return type(x)(conv(y) for y in x)
            return x

        try:
            return self._node_expr(n, conv)
        except pointwise.ExprError:
            return None

    def _expression(self, roots, region, sink, extras, pointwise):
        """The region as one expression over ``roots`` (``ACC``, and ``ACC1`` for a dual
        GEMM) and ``extras`` (``IN0``..); returns (expression, extras in ``INk`` order)."""
        (expr,), leaves = self._expressions(roots, region, [sink], extras, pointwise)
        return expr, leaves

    def _expressions(self, roots, region, outputs, extras, pointwise):
        """:meth:`_expression` for several ``outputs`` (nodes of the region, or roots)
        over the same leaves: (expressions, extras in ``INk`` order)."""
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
            env[n] = self._node_expr(n, conv)
        return [env[o] for o in outputs], leaves

    @staticmethod
    def _node_expr(n: fx.Node, conv) -> Any:
        """``n`` as an expression, its tensor inputs given by ``conv`` (a node to a leaf or
        an expression); raises ``ExprError`` when the printer does not take it."""
        args = [conv(a) for a in n.args]
        kwargs = {k: conv(v) for k, v in n.kwargs.items()}
        if kwargs.get("device") is not None and _same_device(n.args[0], kwargs["device"]):
            del kwargs["device"]  # (``type_as``'s copy names the device it stays on)
        return pointwise_aten.from_aten(n.target, args, kwargs)

    @staticmethod
    def _batched(gemm: fx.Node) -> bool:
        return gemm.target is torch.ops.tile.bmm.default

    def _batched_extras(self, gemm, sink, leaves, a, root):
        """:meth:`_extra_inputs` of a bmm: the fused op takes ``a`` with the dims of the
        output (the N-d tensor a 4-D matmul viewed as ``[batch, M, K]``, else ``a`` viewed
        so, :meth:`_split_batch`) and every extra as it is, read through row strides."""
        out_shape = _val(sink).shape
        x = a if _val(a).dim() == len(out_shape) else self._unfolded(a, out_shape)
        if x is None:
            x = self._split_batch(gemm, a, root)
        if x is None:
            why = f"the output {tuple(out_shape)} is not the batched GEMM's with its batch split"
            return None, why, None
        for e in leaves:
            if not self._broadcasts_to(_val(e).shape, out_shape):
                shape = tuple(_val(e).shape)
                return None, f"extra input {e.name} {shape} does not broadcast to the output", None
        return [("as_is", e, None) for e in leaves], None, x

    def _extra_inputs(self, gemm, sink, leaves, a, root=None):
        """How each extra reaches the fused op: ``(kind, node, shape)``, kind ``"as_is"`` or
        ``"view"`` (an N-d extra of the N-d output, viewed as the GEMM's ``[M, N]``; or
        one with leading dims of size 1, a layer scale stored ``[1, 1, N]``, viewed
        without them).  Returns (that list, None, the GEMM's ``a``) or (None, why, None).

        An extra that broadcasts over some rows of the N-d output but not over the
        GEMM's folded ``[M, N]`` (a per-sample gate ``[B, 1, N]``, a position table
        ``[T, N]``) needs the output N-d: the fused op then takes the N-d tensor the
        linear viewed as ``a [M, K]`` (:meth:`_unfolded`) and every extra as it is.
        A bmm's: :meth:`_batched_extras`."""
        if self._batched(gemm):
            return self._batched_extras(gemm, sink, leaves, a, root or self._gemm_root(gemm))
        out_shape = _val(sink).shape
        m_n = _val(gemm).shape
        extra_nodes, per_row = [], []
        for e in leaves:
            v = _val(e)
            if v.dim() <= 2 and self._broadcasts_to(v.shape, m_n):
                extra_nodes.append(("as_is", e, None))
            elif (
                v.dim() > 2
                and all(self.facts.prove_eq(s, 1) for s in v.shape[:-2])
                and not shapes.is_symbolic(v.shape[-1])  # (a symbolic M is viewed as -1)
            ):
                extra_nodes.append(("view", e, list(v.shape[-2:])))
            elif (
                v.dim() > 2
                and self._same(v.shape, out_shape)
                and self.facts.prove_contiguous(v.shape, v.stride()) is True
                and not shapes.is_symbolic(m_n[1])  # (a symbolic M is viewed as -1)
            ):
                extra_nodes.append(("view", e, [m_n[0], m_n[1]]))
            elif len(out_shape) > 2 and self._broadcasts_to(v.shape, out_shape):
                per_row.append(e)
                extra_nodes.append(("as_is", e, None))
            elif v.dim() <= 2:  # (the fused op's check says why)
                extra_nodes.append(("as_is", e, None))
            else:
                return None, f"extra input {e.name} {tuple(v.shape)} is not 2-D", None
        if not per_row:
            return extra_nodes, None, a
        e = per_row[0]
        x = self._unfolded(a, out_shape)
        if x is None:
            why = f"extra input {e.name} {tuple(_val(e).shape)} needs the N-d output"
            return None, f"{why}, and the GEMM's input is not a view of an N-d tensor", None
        for _, e, _ in extra_nodes:
            if not self._broadcasts_to(_val(e).shape, out_shape):
                shape = tuple(_val(e).shape)
                return None, f"extra input {e.name} {shape} is 2-D beside a per-row one", None
        return [("as_is", e, None) for _, e, _ in extra_nodes], None, x

    def _split_batch(self, gemm: fx.Node, a: Any, root: fx.Node) -> fx.Node | None:
        """``a [batch, M, K]`` viewed with the batch dims of the view ``root`` of the bmm's
        result ``[batch, M, N]`` (a gradient's ``[B * H, T, D]`` viewed as ``[B, H, T,
        D]``): splitting a dim is always a view.  None when the root is no such view.
        The node goes before the root; :meth:`_drop_unused` erases it if nothing reads it."""
        if root is gemm or not isinstance(a, fx.Node) or not isinstance(root.args[1], list):
            return None
        if not self._same(_val(root).shape[-2:], _val(gemm).shape[-2:]):
            return None
        with self.graph.inserting_before(root):
            size = [*root.args[1][:-1], self._size_of(a, -1)]
            x = self.graph.call_function(aten.view.default, (a, size))
            self._meta(x)
        self._made.append(x)
        return x

    def _drop_unused(self) -> None:
        """Erase the nodes :meth:`_split_batch` and :meth:`_size_of` made that no fused op
        took."""
        for n in reversed(self._made):
            if not n.users:
                self.graph.erase_node(n)
        self._made.clear()

    def _unfolded(self, a, out_shape) -> fx.Node | None:
        """The N-d tensor that ``a`` (a GEMM's ``[M, K]`` input) views with its leading
        dims folded, when those are the N-d output's; else None."""
        if not isinstance(a, fx.Node) or a.target not in _VIEWS:
            return None
        x = a.args[0]
        vx = _val(x) if isinstance(x, fx.Node) else None
        if vx is None or vx.dim() != len(out_shape):
            return None
        if not self._same(vx.shape[:-1], out_shape[:-1]):
            return None
        return x if self.facts.prove_eq(vx.shape[-1], _val(a).shape[-1]) is True else None

    @staticmethod
    def _extra_values(extra_nodes) -> list[Any]:
        """The extras' (hinted) values as the fused op's check sees them."""
        vals = []
        for kind, e, shape in extra_nodes:
            v = shapes.hinted(_val(e))
            vals.append(_Reshaped(v, shape) if kind == "view" else v)
        return vals

    def _insert_extras(self, extra_nodes) -> list:
        """The graph nodes of a region's extra inputs (a view node inserted where an extra
        is read reshaped); call inside ``graph.inserting_before``."""
        extras = []
        for kind, e, shape in extra_nodes:
            if kind == "view":
                m, n = shape  # N static; a symbolic M (batch x tokens) is what is left
                size = [-1 if shapes.is_symbolic(m) else m, n]
                e = self.graph.call_function(aten.view.default, (e, size))
                self._meta(e)
            extras.append(e)
        return extras

    def _splice(self, op, args, gemms, roots, region, sink, extra_nodes, also=()) -> None:
        """Insert ``op(*args[:-1], extras, args[-1])`` (the extras go before the expression)
        for the region, viewed back to N-d when the first root is a view, and erase what it
        replaces (``also``: more nodes that may be dead now)."""
        graph = self.graph
        with graph.inserting_before(sink):
            extras = self._insert_extras(extra_nodes)
            fused = graph.call_function(op, (*args[:-1], extras, args[-1]))
            self._meta(fused)
            out = fused
            if roots[0] is not gemms[0] and _val(fused).dim() == 2:  # (not when a is N-d)
                out = graph.call_function(aten.view.default, (fused, list(roots[0].args[1])))
                self._meta(out)
        sink.replace_all_uses_with(out)
        self._erase_unused([*region, *roots, *gemms, *also])  # (a root is its gemm w/o view)
        self.count += 1

    def _view_root(self, gemm: fx.Node) -> fx.Node | None:
        """The view back to N-d among the users of a GEMM that has other users too (a
        training forward saving the 2-D result), else None."""
        if len(gemm.users) < 2:
            return None
        for u in gemm.users:
            if u.target in _VIEWS and self.facts.prove_eq(_val(u).shape[-1], _val(gemm).shape[-1]):
                return u
        return None

    def _fuse_open(self, gemm, parts, root, pointwise) -> str | None:
        """Fuse the region grown from ``root`` although some of its values (the GEMM
        result included) are used outside it, as in a training forward whose backward
        saves them: one ``tile::mm_epilogue_multi`` writes the sink and each such value
        (at most ``MAX_EXTRA_OUTPUTS``).  Tried on the whole region (a ReLU's backward
        mask and a dropout after it are two branches), then on the ancestors of one of
        its nodes, latest first (what does not feed that node stays outside), so a
        region with a branch the kernel cannot compute, or with more values read outside
        it than the kernel writes, still fuses in part.  Returns None, or why it was not
        fused (the whole region's reason)."""
        region, why = self._grow_region([root], pointwise)
        if not region:
            return why
        inside = set(region)
        first_why, seen, tries = None, [], 0
        for members in (
            inside,
            *(self._ancestors_within(n, inside) | {n} for n in reversed(region)),
        ):
            if members in seen:
                continue
            seen.append(members)
            why = self._fuse_open_members(gemm, parts, root, region, members, pointwise)
            if why is None:
                return None
            first_why = first_why or why
            # (that refusal is cheap; the others build the kernel's expression, and may
            # move a late input up)
            tries += not isinstance(why, _TooMany)
            if tries == 3:
                break
        return first_why

    def _fuse_open_members(self, gemm, parts, root, region, members, pointwise) -> str | None:
        """:meth:`_fuse_open` for the nodes ``members`` of the grown ``region``."""
        from ..codegen import fused_matmul, fused_matmul_multi

        a, b, bias = parts
        kept = [n for n in region if n in members]
        inside = members | {root}
        ends = [n for n in kept if set(n.users) - members]  # (the latest is one)
        sink = ends[-1]
        # the values written besides the sink: the GEMM's own 2-D result when a user
        # other than ``root`` reads it, then the region's values read outside it
        outputs = [n for n in dict.fromkeys((gemm, root)) if set(n.users) - inside]
        outputs += [n for n in ends if n is not sink]
        if not outputs:
            return "the region has no sink"
        if len(outputs) > fused_matmul_multi.MAX_EXTRA_OUTPUTS:
            names = ", ".join(n.name for n in outputs)
            return _TooMany(f"{len(outputs)} values of the region are used outside it ({names})")
        out_shape = _val(sink).shape
        for n in outputs:
            shape = _val(gemm).shape if n is gemm else out_shape
            if not self._same(_val(n).shape, shape):
                return f"{n.name} {tuple(_val(n).shape)} does not have the output's shape"
        batched = self._batched(gemm)
        kept = self._absorb_producers([root], kept)  # (read only inside: never written)
        written = [sink, *(root if n is gemm else n for n in outputs)]  # gemm's is ACC too
        try:
            exprs, leaves = self._expressions(
                [root], kept, written, self._leaves([root], kept), pointwise
            )
        except pointwise.ExprError as e:
            return f"epilogue not expressible: {e}"
        extra_nodes, why, a = self._extra_inputs(gemm, sink, leaves, a, root)
        if extra_nodes is None:
            return why
        # the fused op goes before the first node it replaces that follows all its inputs;
        # every outside use of a value it writes must come after that point
        inputs = [x for x in (a, b, bias, *leaves) if isinstance(x, fx.Node)]
        for attempt in range(2):
            order = self._order()
            last_input = max(order[x] for x in inputs)
            anchor = min((n for n in (gemm, root, *kept) if order[n] > last_input), key=order.get)
            early = [
                (n, u)
                for n in outputs
                for u in n.users
                if u not in inside and order[u] <= order[anchor]
            ]
            if not early:
                break
            # an extra computed late (a recomputed ``1 + scale``) moves up, if it can
            first = min((gemm, root, *kept), key=order.get)
            if attempt or self._hoist_inputs(inputs, first) is not None:
                n, u = early[0]
                return f"{n.name} is used by {u.name} before the fused op could run"
        hinted = [shapes.hinted(_val(x)) for x in (a, b, bias)]
        ex_vals = self._extra_values(extra_nodes)
        # the kernel's first result is a float one (a bool result, a ReLU's backward mask
        # that comes last in the graph, is one of the others)
        results = [sink, *outputs]
        first = next((i for i, n in enumerate(results) if _val(n).is_floating_point()), 0)
        results.insert(0, results.pop(first))
        exprs.insert(0, exprs.pop(first))
        exprs_s = [pointwise.dumps(e) for e in exprs]
        reason = fused_matmul_multi.check(*hinted, ex_vals, exprs_s)
        if reason is not None:
            return f"fused epilogue refused: {reason}"
        leaf_dtypes = fused_matmul._leaf_dtypes(hinted[0], ex_vals)
        for n, e in zip(results, exprs):
            if pointwise.infer_dtype(e, leaf_dtypes) != _val(n).dtype:
                return f"{n.name}'s dtype {_val(n).dtype} is not its expression's"
        self._splice_multi(
            gemm,
            (a, b, bias),
            root,
            kept,
            results,
            exprs_s,
            anchor,
            extra_nodes,
            also=[parts[0]] if parts[0] is not a else [],  # (a's view, when a is N-d)
        )
        kind = "bmm" if batched else "mm"
        self.report.replacements.append(
            Replacement(
                pattern=f"fused_{kind}_epilogue",
                nodes=[gemm.name, *(n.name for n in kept)],
                targets=[kind, *[short_target(n.target) for n in kept]],
                inputs={"a": describe_value(_val(a)), "b": describe_value(_val(b))},
                scalars={
                    "expr": exprs_s[0],
                    "extra_outputs": len(outputs),
                    "also_writes": [n.name for n in outputs],
                },
            )
        )
        return None

    def _size_of(self, node: fx.Node, dim: int) -> Any:
        """``node``'s size along ``dim``: an int, or a ``sym_size`` node when symbolic
        (insert under ``graph.inserting_before``)."""
        size = _val(node).shape[dim]
        if not shapes.is_symbolic(size):
            return int(size)
        n = self.graph.call_function(aten.sym_size.int, (node, dim))
        self._meta(n)
        self._made.append(n)
        return n

    def _hoist_inputs(self, nodes, before: fx.Node) -> str | None:
        """Move those of ``nodes`` after ``before``, with their ancestors after it, to just
        before it (in their order); None, or why nothing moved: one of them is computed
        from ``before``, or draws random numbers or mutates (their order is part of the
        result).  A seed a fused op draws its random numbers from (:meth:`_new_seed`) may
        move: it is one draw of the fused ops' own stream, merged with the others later."""
        from .cse import draws_random, mutates

        order = self._order()
        todo: set[fx.Node] = set()
        stack = [n for n in nodes if order[n] > order[before]]
        while stack:
            n = stack.pop()
            if n in todo:
                continue
            if before in n.all_input_nodes:
                return f"{n.name} is computed from {before.name}"
            seed = n.meta.get(_SEED_META, False)
            if n.op != "call_function" or mutates(n) or (draws_random(n.target) and not seed):
                return f"{n.name} draws random numbers or mutates: it keeps its place"
            todo.add(n)
            stack.extend(x for x in n.all_input_nodes if order[x] > order[before])
        for n in sorted(todo, key=order.__getitem__):
            before.prepend(n)
        return None

    def _splice_multi(
        self, gemm, parts, root, region, results, exprs, anchor, extra_nodes, also=()
    ):
        """Insert ``tile::mm_epilogue_multi(*parts, extras, exprs)`` before ``anchor``; each
        of ``results`` (the sink, then the values also used elsewhere) is replaced by its
        output (viewed back to N-d when ``root`` is a view), and what it replaces erased."""
        graph = self.graph
        with graph.inserting_before(anchor):
            extras = self._insert_extras(extra_nodes)
            fused = graph.call_function(
                torch.ops.tile.mm_epilogue_multi.default, (*parts, extras, exprs)
            )
            self._meta(fused)
            news = []
            for i in range(len(results)):
                out = graph.call_function(operator.getitem, (fused, i))
                self._meta(out)
                if root is gemm or _val(out).dim() == _val(results[i]).dim():
                    pass
                elif results[i] is gemm:  # (the N-d a's result, read as the GEMM's)
                    size = [-1, root.args[1][-1]]
                    if self._batched(gemm):  # [batch, M, N]: M and N read off the output
                        size = [-1, *(self._size_of(out, d) for d in (-2, -1))]
                    out = graph.call_function(aten.view.default, (out, size))
                    self._meta(out)
                else:
                    out = graph.call_function(aten.view.default, (out, list(root.args[1])))
                    self._meta(out)
                news.append(out)
        for n, new in zip(results, news):
            n.replace_all_uses_with(new)
        self._erase_unused([*region, root, gemm, *also])
        self.count += 1

    # --- a GEMM read transposed ------------------------------------------------------

    def transposed_gemms(self) -> None:
        """``t(a @ b)`` read by pointwise ops (a weight gradient cast to an fp32 master
        weight's dtype in mixed-precision training) becomes ``b.t() @ a.t()``: the same
        values as a GEMM result of the read shape, so the epilogue grows over those ops.
        Transposes are views: nothing is copied (an addmm's ``[N]`` bias becomes the
        column ``[N, 1]``)."""
        tile = torch.ops.tile
        for gemm in list(self.graph.nodes):
            if gemm.op != "call_function" or gemm.target not in (
                tile.mm.default,
                tile.addmm.default,
            ):
                continue
            if len(gemm.users) != 1:
                continue
            (tr,) = gemm.users
            if not self._is_transpose(tr) or not any(
                u.op == "call_function" and pointwise_aten.is_pointwise(u.target) for u in tr.users
            ):
                continue
            bias = gemm.args[0] if gemm.target is tile.addmm.default else None
            a, b = gemm.args[1:3] if bias is not None else gemm.args[:2]
            if bias is not None and (not isinstance(bias, fx.Node) or _val(bias).dim() > 2):
                continue
            with self.graph.inserting_before(tr):
                bt, at = (self._transposed(x) for x in (b, a))
                if bias is None:
                    new = self.graph.call_function(tile.mm.default, (bt, at))
                else:
                    if _val(bias).dim() == 2:
                        col = self._transposed(bias)
                    else:
                        col = self.graph.call_function(aten.unsqueeze.default, (bias, -1))
                        self._meta(col)
                    rest = (col, bt, at, *gemm.args[3:])
                    new = self.graph.call_function(tile.addmm.default, rest, gemm.kwargs)
                self._meta(new)
            tr.replace_all_uses_with(new)
            self.graph.erase_node(tr)
            self.graph.erase_node(gemm)
            for x in dict.fromkeys((a, b)):  # (a transpose read only by the GEMM)
                if isinstance(x, fx.Node) and not x.users and self._is_transpose(x):
                    self.graph.erase_node(x)
            self.touched = True

    @staticmethod
    def _is_transpose(n: fx.Node) -> bool:
        """``n`` swaps the two dims of a 2-D value (``t``, ``transpose``, ``permute``)."""
        if n.op != "call_function":
            return False
        if n.target is aten.t.default:
            return True
        if n.target is aten.transpose.int:
            return sorted(d % 2 for d in n.args[1:3]) == [0, 1]
        return n.target is aten.permute.default and [d % 2 for d in n.args[1]] == [1, 0]

    def _transposed(self, x: fx.Node) -> fx.Node:
        """``x.t()``: the value ``x`` transposes, when it is a transpose (no ``t(t(v))``)."""
        if self._is_transpose(x) and isinstance(x.args[0], fx.Node):
            return x.args[0]
        t = self.graph.call_function(aten.permute.default, (x, [1, 0]))  # (not aten.t:
        # Inductor's graphs have it decomposed)
        self._meta(t)
        return t

    # --- a GEMM split in two halves ---------------------------------------------------

    def split_gemms(self) -> None:
        """``gate, up = linear(x, W_gate_up).chunk(2, -1)`` whose halves meet in a pointwise
        op (Phi-3's SwiGLU) becomes two GEMMs over the column halves of ``W`` (views, no
        copy), so :meth:`dual_matmul_epilogues` can run them as one dual GEMM."""
        from ..codegen import pointwise

        tile = torch.ops.tile
        for gemm in list(self.graph.nodes):
            parts = self._gemm_parts(gemm)
            if parts is None:
                continue
            root = self._gemm_root(gemm)
            halves = self._split_halves(root)
            if halves is None or not self._meet_in_pointwise(list(halves), pointwise):
                continue
            a, b, bias = parts
            n = _val(gemm).shape[-1]
            h = n // 2
            graph = self.graph
            news = []
            with graph.inserting_before(gemm):
                for lo, hi in ((0, h), (h, n)):
                    bh = graph.call_function(aten.slice.Tensor, (b, 1, lo, hi))
                    self._meta(bh)
                    if bias is None:
                        g = graph.call_function(tile.mm.default, (a, bh))
                    else:
                        dim = _val(bias).dim() - 1
                        biash = graph.call_function(aten.slice.Tensor, (bias, dim, lo, hi))
                        self._meta(biash)
                        g = graph.call_function(tile.addmm.default, (biash, a, bh))
                    self._meta(g)
                    if root is not gemm:
                        g = graph.call_function(aten.view.default, (g, [*root.args[1][:-1], h]))
                        self._meta(g)
                    news.append(g)
            split = halves[0].args[0]
            for half, new in zip(halves, news):
                half.replace_all_uses_with(new)
            for node in dict.fromkeys((*halves, split, root, gemm)):
                if not node.users:
                    graph.erase_node(node)

    def _split_halves(self, root: fx.Node):
        """The two getitems of ``split(root, N / 2, -1)`` when that is ``root``'s only use
        (static ``N``), else None."""
        if len(root.users) != 1:
            return None
        (split,) = root.users
        if split.target is not aten.split.Tensor or len(split.args) < 2:
            return None
        size, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
        shape = _val(root).shape
        n = shape[-1]
        if not isinstance(n, int) or n % 2 or size != n // 2 or dim not in (-1, len(shape) - 1):
            return None
        outs = {u.args[1]: u for u in split.users if u.target is operator.getitem}
        if len(outs) != len(split.users) or set(outs) != {0, 1}:
            return None
        return outs[0], outs[1]

    # --- dual GEMM epilogue ------------------------------------------------------------

    def dual_matmul_epilogues(self) -> None:
        """Two GEMMs of one ``a`` whose results are used only by one pointwise region
        (SwiGLU's ``silu(x @ W1) * (x @ W3)``) become one ``tile::dual_mm_epilogue``: one
        kernel loads each A tile once for both accumulators.  Runs before
        :meth:`matmul_epilogues`, which would fuse the region into one GEMM only."""
        from ..codegen import pointwise

        gemms = [n for n in self.graph.nodes if self._gemm_parts(n) is not None]
        taken: set[fx.Node] = set()
        for i, g0 in enumerate(gemms):
            # (operands read afresh: a pair fused before may have replaced what these
            # read, as a second gated block reads the first's product)
            p0 = self._gemm_parts(g0)
            for g1 in gemms[i + 1 :]:
                if g0 in taken or p0 is None:
                    break
                p1 = self._gemm_parts(g1)
                if g1 in taken or p1 is None or not self._same_input(p0[0], p1[0]):
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
                if (
                    n in seen
                    or n.op != "call_function"
                    or not pointwise_aten.is_pointwise(n.target)
                ):
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
        extra_nodes, why, a = self._extra_inputs(g0, sink, leaves, a0)
        if extra_nodes is None:
            return why
        expr_s = pointwise.dumps(expr)
        hinted = [shapes.hinted(_val(x)) for x in (a, b0, b1, bias0, bias1)]
        reason = dual_matmul.check(*hinted, self._extra_values(extra_nodes), expr_s)
        if reason is not None:
            return f"fused dual epilogue refused: {reason}"
        self._splice(
            torch.ops.tile.dual_mm_epilogue.default,
            (a, b0, b1, bias0, bias1, expr_s),
            [g0, g1],
            roots,
            region,
            sink,
            extra_nodes,
            also=[x for x in dict.fromkeys((a0, a1)) if x is not a],  # (a's views, now unused)
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


class _TooMany(str):
    """A refusal of :meth:`MatmulFusions._fuse_open_members` for its output count."""


def _same_device(x: Any, device: Any) -> bool:
    """``x`` (a graph value) is on ``device`` already."""
    v = _val(x) if isinstance(x, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.device == torch.device(device)


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
