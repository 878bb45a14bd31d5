"""Fusion: grow each tile anchor into the pointwise ops around it, one kernel per region.

* **matmul epilogues** (not a fixed menu): from a ``tile::mm``/``tile::addmm`` (through the
  view a linear on N-d inputs adds), absorb every pointwise ATen op whose tensor inputs
  are in the region or are *extra inputs* that broadcast to the output; the region ends
  at one sink whose value leaves it.  An intermediate used outside the region must still
  be written, so it bounds the region.  The ops become one expression
  (``codegen.pointwise``) generated into ``tile::mm_epilogue``'s kernel.
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

    def matmul_epilogues(self) -> None:
        from ..codegen import fused_matmul, pointwise

        tile = torch.ops.tile
        for gemm in list(self.graph.nodes):
            if gemm.op != "call_function":
                continue
            if gemm.target is tile.mm.default:
                a, b = gemm.args[:2]
                bias = None
            elif gemm.target is tile.addmm.default:
                bias, a, b = gemm.args[:3]
                beta = gemm.kwargs.get("beta", gemm.args[3] if len(gemm.args) > 3 else 1)
                alpha = gemm.kwargs.get("alpha", gemm.args[4] if len(gemm.args) > 4 else 1)
                if beta != 1 or alpha != 1:
                    continue
            else:
                continue
            root = gemm
            if len(gemm.users) == 1:
                (u,) = gemm.users
                if u.target in _VIEWS and self.facts.prove_eq(
                    _val(u).shape[-1], _val(gemm).shape[-1]
                ):
                    root = u  # linear on N-d inputs: fuse through the view back
            region, sink, extras, why = self._grow(root, pointwise)
            if sink is None:
                if why:
                    self._note(gemm, why)
                continue
            try:
                expr, leaves = self._expression(root, region, sink, extras, pointwise)
            except pointwise.ExprError as e:
                self._note(gemm, f"epilogue not expressible: {e}")
                continue
            out_shape = _val(sink).shape
            m_n = _val(gemm).shape
            extra_nodes = []
            ok = True
            for e in leaves:
                v = _val(e)
                if v.dim() > 2:
                    if (
                        not self._same(v.shape, out_shape)
                        or self.facts.prove_contiguous(v.shape, v.stride()) is not True
                        or any(shapes.is_symbolic(d) for d in m_n)
                    ):
                        self._note(gemm, f"extra input {e.name} {tuple(v.shape)} is not 2-D")
                        ok = False
                        break
                    extra_nodes.append(("view", e, [m_n[0], m_n[1]]))
                else:
                    extra_nodes.append(("as_is", e, None))
            if not ok:
                continue
            hinted = [shapes.hinted(_val(x)) for x in (a, b, bias)]
            ex_vals = []
            for kind, e, shape in extra_nodes:
                v = shapes.hinted(_val(e))
                ex_vals.append(_Reshaped(v, shape) if kind == "view" else v)
            expr_s = pointwise.dumps(expr)
            reason = fused_matmul.check(*hinted, ex_vals, expr_s)
            if reason is not None:
                self._note(gemm, f"fused epilogue refused: {reason}")
                continue
            self._splice_epilogue(gemm, root, region, sink, a, b, bias, extra_nodes, expr_s)

    def _grow(self, root: fx.Node, pointwise):
        """Absorb pointwise users of the region; return (region, sink, extras, why)."""
        region: list[fx.Node] = []
        inside = {root}
        downstream = _descendants(root)
        frontier = list(root.users)
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
            if not _is_tensor_node(u) or not self._same(_val(u).shape, _val(root).shape):
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
            ) and all(u in members for u in root.users)
            if closed:
                kept = [n for n in region if n in members]
                extras = [
                    a for n in kept for a in n.all_input_nodes if a not in members and a is not root
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

    def _expression(self, root, region, sink, extras, pointwise):
        env: dict[fx.Node, Any] = {root: "ACC"}
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

    def _splice_epilogue(self, gemm, root, region, sink, a, b, bias, extra_nodes, expr_s):
        tile = torch.ops.tile
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
            fused = graph.call_function(tile.mm_epilogue.default, (a, b, bias, extras, expr_s))
            self._meta(fused)
            out = fused
            if root is not gemm:
                out = graph.call_function(aten.view.default, (fused, list(root.args[1])))
                self._meta(out)
        sink.replace_all_uses_with(out)
        absorbed = [n.name for n in region]
        dead = dict.fromkeys([*region, root, gemm])  # root is gemm when there is no view
        for n in sorted(dead, key=self._order().__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
        self.count += 1
        self.report.replacements.append(
            Replacement(
                pattern="fused_mm_epilogue",
                nodes=[gemm.name, *absorbed],
                targets=["mm", *[short_target(n.target) for n in region]],
                inputs={"a": describe_value(_val(a)), "b": describe_value(_val(b))},
                scalars={"expr": expr_s},
            )
        )

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
    from ..codegen import fused_matmul, fused_norm, fused_softmax  # noqa: F401  (tile:: ops)

    f = _Fuser(gm, report)
    f.residual_norms()
    f.softmax_prologues()
    f.matmul_epilogues()
    if f.count:
        gm.graph.lint()
        gm.recompile()
    return f.count
