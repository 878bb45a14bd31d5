"""Softmax fusions (see :mod:`.fusion`): the scale / mask prologue, a dropout after it,
and in backward graphs the dropout's backward and the prologue's scale around
``tile::softmax_backward``."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ..report import Replacement, describe_value, short_target
from . import shapes
from .fusion_core import _CASTS, FuserBase, _is_tensor_node, _single_use, _val, aten


class SoftmaxFusions(FuserBase):
    # --- softmax prologue --------------------------------------------------------------

    def softmax_prologues(self) -> None:
        tile = torch.ops.tile
        for sm in list(self.graph.nodes):
            call = _softmax_call(sm)
            if call is None:
                continue
            x, dim, half_to_float, safe = call
            # softmax(..., dtype=float32).to(half), Llama's eager attention in fp16 / bf16:
            # the upcast (or half_to_float) and the cast back are absorbed when the fp32
            # probabilities are used only by that cast: one kernel, half in and out.  When
            # they are used otherwise too (training saves them), the kernel reads the half
            # scores and stores the fp32 probabilities.
            up, down = self._upcast_softmax(sm, x, half_to_float)
            stored = None  # the dtype the kernel stores, when not the prologue's own
            if down is None:
                src = self._half_input(sm, x, half_to_float)
                if src is None and half_to_float:
                    continue
                if src is not None:
                    up, stored = (None if half_to_float else src), torch.float32
            pro = self._match_prologue(up or x)
            base, consumed, added, keep = pro.base, pro.consumed, pro.added, pro.keep
            mask, fill, scale = pro.mask, pro.fill, pro.scale
            bias = added[-1] if added else None  # added first
            mask_added = added[0] if len(added) == 2 else None  # then this one
            left = self._not_absorbed(base)
            if left is not None:
                self._note(sm, left)
            if not consumed:
                continue
            if up is not None:
                consumed.insert(0, x)  # the upcast, erased after the ops before it
            xv = _val(base)
            m = mask if keep is None else keep
            why = self._prologue_refusal(xv, m, added, fill, dim)
            if why is not None:
                self._note(sm, f"prologue not fused: {why}")
                continue
            kwargs = {} if stored is None else {"dtype": stored}
            if not kwargs and down is None and (down := self._half_cast_after(sm)) is not None:
                kwargs["dtype"] = _val(down).dtype  # fp32 math, stored as the cast's
            if safe:
                kwargs["safe"] = True
            with self.graph.inserting_before(sm):
                if keep is not None:
                    mask = self.graph.call_function(aten.logical_not.default, (keep,))
                    self._meta(mask)
                if mask is None and mask_added is None:  # one added tensor: the op's mask
                    args = (base, scale, bias, -1)
                elif mask is None:
                    args = (base, scale, mask_added, -1)
                    kwargs["bias"] = bias
                else:
                    args = (base, scale, mask, -1)
                    if bias is not None:
                        kwargs["bias"] = bias
                    if fill != -math.inf:
                        kwargs["fill"] = fill
                fused = self.graph.call_function(tile.scale_mask_softmax.default, args, kwargs)
                self._meta(fused)
            result = down or sm  # the node the fused op stands for
            if (
                not self._same(_val(fused).shape, _val(result).shape)
                or _val(fused).dtype != _val(result).dtype
            ):
                self.graph.erase_node(fused)
                if keep is not None:
                    self.graph.erase_node(mask)
                continue
            result.replace_all_uses_with(fused)
            for n in [*([down] if down is not None else []), sm, *consumed, *pro.consts]:
                if isinstance(n, fx.Node) and not n.users:
                    self.graph.erase_node(n)
            self.count += 1
            fused_nodes = [*reversed(consumed), sm, *([down] if down is not None else [])]
            self.report.replacements.append(
                Replacement(
                    pattern="fused_scale_mask_softmax",
                    nodes=[n.name for n in fused_nodes],
                    targets=[short_target(n.target) for n in fused_nodes],
                    inputs={"x": describe_value(xv)}
                    | ({"mask": describe_value(_val(m))} if (m := mask or mask_added) else {})
                    | ({"bias": describe_value(_val(bias))} if bias is not None else {}),
                    scalars={"scale": scale, "mask_mode": _mask_mode(mask, added)}
                    | ({"fill": fill} if mask is not None and fill != -math.inf else {})
                    | ({"dtype": str(kwargs["dtype"])} if "dtype" in kwargs else {})
                    | ({"safe": True} if safe else {}),
                )
            )

    def _match_prologue(self, base: Any) -> _Prologue:
        """Walk up from the softmax input ``base`` over what the kernel can take.

        ``base`` may be: ``masked_fill(z, mask, v) | z``; ``z = add(s, t) | s`` (without a
        fill, two adds: ``add(add(s, bias), mask)``, T5's position bias, then its attention
        mask); ``s = mul(y, c) | div(y, c)``.  ``v`` is a constant (-inf drops the entry;
        MPT fills with finfo.min).  masked_fill also as Inductor's decomposition has it,
        ``where(mask, v, z)``, or written the other way round, ``where(keep, z, v)``."""
        pro = _Prologue(base)
        where = self._where_fill(base) if _single_use(base) else None
        if _single_use(base) and base.target is aten.masked_fill.Scalar:
            pro.mask, pro.fill = base.args[1], base.args[2]
            pro.take(base, base.args[0])
        elif where is not None:
            cond, scores, pro.fill, inverted = where
            pro.consts = [a for a in base.args[1:3] if a is not scores]
            pro.mask, pro.keep = (None, cond) if inverted else (cond, None)
            pro.take(base, scores)
        while len(pro.added) < (1 if pro.fill is not None else 2) and _plain_add(pro.base):
            pro.added.append(pro.base.args[1])
            pro.take(pro.base, pro.base.args[0])
        b = pro.base
        c = b.args[1] if isinstance(b, fx.Node) and len(b.args) > 1 else None
        if (
            _single_use(b)
            and b.target in (aten.mul.Tensor, aten.div.Tensor)
            and isinstance(c, (int, float))
            and not isinstance(c, bool)
            and c != 0
        ):
            pro.scale = float(c) if b.target is aten.mul.Tensor else 1.0 / float(c)
            pro.take(b, b.args[0])
        return pro

    def _prologue_refusal(self, xv, m, added, fill, dim) -> str | None:
        """Why a matched prologue (bool mask read from node ``m``, the ``added`` tensors,
        a ``fill`` value) cannot go into the kernel with scores ``xv``, or None."""
        float_types = (torch.float32, torch.float16, torch.bfloat16)
        for t in added:
            tv = _val(t)
            if tv.dtype not in float_types:
                return f"added tensor {t.name} is {tv.dtype}"
            if not self._broadcasts_to(tv.shape, xv.shape):
                return (
                    f"added tensor {t.name} {list(tv.shape)} does not broadcast to {list(xv.shape)}"
                )
        if m is not None:
            mv = _val(m)
            if not self._broadcasts_to(mv.shape, xv.shape):
                return f"mask {m.name} {list(mv.shape)} does not broadcast to {list(xv.shape)}"
            if mv.dtype != torch.bool:
                return f"masked_fill's mask {m.name} is {mv.dtype}, not bool"
            if not isinstance(fill, (int, float)) or isinstance(fill, bool) or fill != fill:
                return f"masked_fill's value {fill!r} is not a number"
        if not isinstance(dim, int) or dim % xv.dim() != xv.dim() - 1:
            return f"softmax over dim {dim}, not the last"
        return None

    def _where_fill(self, node: Any):
        """``(cond, scores, value, inverted)`` for ``where(cond, value, scores)``
        (inverted False: ``cond`` marks what is filled) or ``where(cond, scores, value)``
        (inverted True), ``value`` a 0-dim constant and ``cond`` bool; else None."""
        if not (isinstance(node, fx.Node) and node.target is aten.where.self):
            return None
        cond, a, b = node.args[:3]
        if not (_is_tensor_node(cond) and _val(cond).dtype == torch.bool):
            return None
        va, vb = _constant_fill(a), _constant_fill(b)
        if va is not None and _is_tensor_node(b) and vb is None:
            return cond, b, va, False
        if vb is not None and _is_tensor_node(a) and va is None:
            return cond, a, vb, True
        return None

    def _not_absorbed(self, node: Any) -> str | None:
        """Why ``node``, where the prologue match stopped, stays outside the softmax
        kernel when it is a scale or mask op the kernel could otherwise take (None when
        it is not one: a matmul, a view)."""
        if not (isinstance(node, fx.Node) and node.op == "call_function"):
            return None
        t = node.target
        if t not in (
            aten.add.Tensor,
            aten.sub.Tensor,
            aten.mul.Tensor,
            aten.div.Tensor,
            aten.masked_fill.Scalar,
            aten.masked_fill.Tensor,
            aten.where.self,
        ):
            return None
        what = f"{node.name} ({short_target(t)})"
        if not _single_use(node):
            return f"{what} has other users: it is computed apart"
        if t in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], fx.Node):
            return f"{what}: the scale {describe_value(_val(node.args[1]))} is not a constant"
        return (
            f"{what} is outside what the kernel takes: one constant scale, then added "
            "tensors (alpha 1; two at most, one before a fill), then one masked_fill (or "
            "where) with a constant"
        )

    def _half_cast_after(self, sm: fx.Node) -> fx.Node | None:
        """The cast of fp32 probabilities to half that is ``sm``'s only user (MPT's
        ``softmax(scores.float()).to(half)`` whose scores are fp32 already: an fp32
        bias promoted them), or None.  The kernel stores its fp32 result in that dtype:
        the same rounding."""
        (u,) = sm.users if len(sm.users) == 1 else (None,)
        return None if u is None else self._cast_to_half(sm, u)

    def _upcast_softmax(self, sm: fx.Node, x: Any, half_to_float: bool):
        """For ``softmax(x16.float()).to(float16)`` (or ``half_to_float``): ``(x16, the
        cast back)``; ``(None, cast back)`` for half_to_float; ``(None, None)`` when the
        softmax is not that (or its fp32 result is used otherwise)."""
        (down,) = sm.users if len(sm.users) == 1 else (None,)
        if down is None or down.target not in _CASTS:
            return None, None
        src = self._half_input(sm, x, half_to_float)
        if src is None or _val(down).dtype != _val(src).dtype:
            return None, None
        return (None if half_to_float else src), down

    def _half_input(self, sm: fx.Node, x: Any, half_to_float: bool) -> Any:
        """The half-precision scores of an fp32 softmax ``sm`` of input ``x``: ``x``
        itself with ``half_to_float``, the source of a single-use upcast ``x``; else
        None."""
        if half_to_float:
            src = x
        elif _single_use(x) and x.target in _CASTS and _is_tensor_node(x.args[0]):
            src = x.args[0]
        else:
            return None
        if _val(src).dtype not in (torch.float16, torch.bfloat16):
            return None
        return src if _val(sm).dtype == torch.float32 else None

    # --- dropout after a softmax ------------------------------------------------------

    def softmax_dropouts(self) -> None:
        """``dropout(softmax(...))`` -> ``tile::scale_mask_softmax_dropout``, in both forms
        a graph has it: ``aten.native_dropout`` (no decompositions: the eager fallback) and
        Inductor's decomposition ``mul(mul(inductor_random(...) > p, s), 1 / (1 - p))``,
        whose seed node the fused op reads, so the random draws follow Inductor's seeding.
        The probabilities and the keep mask are written only when the backward saves them.
        A cast of fp32 probabilities to half between the softmax and the dropout (T5:
        ``dropout(softmax(scores.float()).type_as(scores))``) is fused too: the kernel
        rounds as the cast does, and writes the dropout's result in half.
        """
        tile = torch.ops.tile
        for sm in list(self.graph.nodes):
            if sm.op != "call_function":
                continue
            if sm.target is tile.scale_mask_softmax.default:
                x, scale, mask, dim, bias, fill, dtype, safe = _scale_mask_softmax_args(sm)
            elif (call := _softmax_call(sm)) is not None and call[2] is False:
                x, dim, _, safe = call
                scale, mask, bias, fill, dtype = 1.0, None, None, None, None
            else:
                continue
            for u in list(sm.users):
                cast = self._cast_to_half(sm, u)
                if cast is not None and len(cast.users) != 1:
                    continue  # the dropout must be the cast's only user
                if cast is not None:
                    found = self._dropout_after(cast, next(iter(cast.users)))
                    if isinstance(found, tuple):
                        *rest, chain = found
                        found = (*rest, [*chain, cast])
                else:
                    found = self._dropout_after(sm, u)
                if found is None:
                    continue
                if isinstance(found, str):
                    self._note(sm, found)
                    continue
                cast_to = None if cast is None else _val(cast).dtype
                prologue = (x, scale, mask, dim, bias, fill, dtype, cast_to, safe)
                self._splice_dropout(sm, prologue, *found)
                break

    def _cast_to_half(self, sm: fx.Node, u: fx.Node) -> fx.Node | None:
        """``u`` when it casts the fp32 probabilities ``sm`` to fp16 / bf16 on their
        device; else None."""
        if u.target not in _CASTS or u.args[0] is not sm:
            return None
        if set(u.kwargs) - {"dtype", "layout", "device"}:
            return None  # a memory format: the kernel writes contiguous rows
        uv, sv = _val(u), _val(sm)
        if sv.dtype != torch.float32 or uv.device != sv.device:
            return None
        return u if uv.dtype in (torch.float16, torch.bfloat16) else None

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
        drawn = [rnd]  # the random draw, and its cast to half (a half dropout's rand_like)
        if isinstance(rnd, fx.Node) and rnd.target in _CASTS and len(rnd.users) == 1:
            rnd = rnd.args[0]
            drawn.append(rnd)
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
        # (the kernel compares its fp32 draw: Inductor's numbers, not rounded to half)
        return float(p), c, rnd.args[1], out, keeps, [out, u, gt, *drawn]

    def _splice_dropout(self, sm, prologue, p, drop_scale, seed, out, keeps, chain):
        """Replace softmax ``sm`` (its ``prologue``: x, scale, mask, dim, bias, fill, the
        dtype it stores, the dtype its probabilities are cast to before the dropout, whether
        it is ``_safe_softmax``) and the dropout ``chain`` after it by one
        ``tile::scale_mask_softmax_dropout``."""
        from ..codegen import fused_softmax_dropout

        x, scale, mask, dim, bias, fill, dtype, cast, safe = prologue
        graph = self.graph
        others = [u for u in sm.users if u not in chain]
        if seed is None:  # native_dropout: draw a seed from torch's generator
            with graph.inserting_before(sm):
                seed = self._new_seed(_val(sm).device)
        else:  # Inductor's seed lookup: make it available where the softmax is
            order = self._order()
            for n in [*seed.all_input_nodes, seed]:
                if order[n] > order[sm]:
                    sm.prepend(n)
        hx, hm, hb = [
            shapes.hinted(_val(v)) if isinstance(v, fx.Node) else v for v in (x, mask, bias)
        ]
        reason = fused_softmax_dropout.check_dropout(
            hx, hm, dim, p, shapes.hinted(_val(seed)), hb, fill
        )
        if reason:
            self._note(sm, f"dropout not fused: {reason}")
            return
        args = (x, scale, mask, dim, p, seed, bool(others), bool(keeps), drop_scale)
        given = {"bias": bias, "fill": fill, "dtype": dtype, "cast": cast, "safe": safe or None}
        kwargs = {k: v for k, v in given.items() if v is not None}
        with graph.inserting_before(sm):
            op = torch.ops.tile.scale_mask_softmax_dropout.default
            fused = graph.call_function(op, args, kwargs)
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
        self._erase_unused([*chain, sm])
        self._erase_unused(parts[1:])
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
                | ({"mask": describe_value(_val(mask))} if mask is not None else {})
                | ({"bias": describe_value(_val(bias))} if bias is not None else {}),
                scalars={
                    "p": p,
                    "scale": scale,
                    "writes_probs": bool(others),
                    "writes_keep": bool(keeps),
                }
                | ({"dtype": str(dtype)} if dtype is not None else {})
                | ({"cast": str(cast)} if cast is not None else {})
                | ({"safe": True} if safe else {}),
            )
        )

    def softmax_backwards(self) -> None:
        """In backward graphs, ``tile::softmax_backward`` absorbs the dropout backward
        before it (``native_dropout_backward(g, keep, c)``, or Inductor's decompositions of
        it: ``mul(mul(g, c), keep)``, ``mul(g, mul(keep.to(float), c))``), also when its
        half result is cast to the fp32 probabilities' dtype (T5's cast before the
        dropout; the kernel rounds as it does), and the softmax prologue's scale after it
        (``mul(dx, scale)``):
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
            src = grad  # the dropout's backward, or under an upcast of its half result
            if (
                _single_use(grad)
                and grad.target in _CASTS
                and _is_tensor_node(grad.args[0])
                and _val(grad.args[0]).dtype in (torch.float16, torch.bfloat16)
            ):
                src = grad.args[0]
                consumed.append(grad)
            if _single_use(src) and src.target is aten.native_dropout_backward.default:
                g, keep, drop_scale = src.args[:3]
                consumed.append(src)
            elif _single_use(src) and src.target is aten.mul.Tensor:
                found = _dropout_grad(src)
                if found is not None:
                    g, keep, drop_scale, absorbed = found
                    consumed += [src, *absorbed]
            if keep is not None and not (
                self._same(_val(keep).shape, vg.shape)
                and self._same(_val(g).shape, vg.shape)
                and _val(g).dtype == _val(src).dtype
                and _val(keep).dtype == torch.bool
                and isinstance(drop_scale, float)
            ):
                keep = None
            # the upcast's backward after: dx cast back to the half scores' dtype (eager
            # attention in half precision, softmax(s * c, dtype=float32).to(half))
            down = self._half_cast_after(sb) if vo.dtype == torch.float32 else None
            if keep is None:  # no dropout absorbed: the upcast goes only with a cast back
                g, drop_scale, consumed = grad, 1.0, []
                if down is not None and src is not grad:
                    g, consumed = src, [grad]  # (the kernel upcasts as it loads)
            scale, tail = 1.0, None
            last = down or sb
            if len(last.users) == 1:
                (u,) = last.users
                c = u.args[1] if u.target is aten.mul.Tensor and len(u.args) == 2 else None
                if u.args[0] is last and isinstance(c, (int, float)) and not isinstance(c, bool):
                    scale, tail = float(c), u
            if keep is None and tail is None and down is None:
                continue
            dx_dtype = in_dtype if down is None else _val(down).dtype
            with self.graph.inserting_before(sb):
                fused = self.graph.call_function(
                    tile.scale_mask_softmax_backward.default,
                    (g, out, scale, dim, dx_dtype, False, keep, float(drop_scale)),
                )
                self._meta(fused)
            (tail or last).replace_all_uses_with(fused)
            for n in [tail, down, sb, *consumed]:
                if n is not None and not n.users:
                    self.graph.erase_node(n)
            self.count += 1
            names = [n for n in (*reversed(consumed), sb, down, tail) if n is not None]
            self.report.replacements.append(
                Replacement(
                    pattern="fused_softmax_backward",
                    nodes=[n.name for n in names],
                    targets=[short_target(n.target) for n in names],
                    inputs={"grad": describe_value(vg), "out": describe_value(vo)},
                    scalars={"scale": scale, "dropout": keep is not None},
                )
            )


@dataclasses.dataclass
class _Prologue:
    """What :meth:`SoftmaxFusions._match_prologue` found above a softmax: the scores
    ``base``, the nodes ``consumed`` (outermost first), the ``added`` tensors (outermost
    first), a bool ``mask`` (or its negation ``keep``) filled with ``fill``, the
    ``scale``, and the constant nodes of a ``where`` (``consts``)."""

    base: Any
    consumed: list = dataclasses.field(default_factory=list)
    added: list = dataclasses.field(default_factory=list)
    mask: Any = None
    keep: Any = None
    fill: Any = None
    scale: float = 1.0
    consts: list = dataclasses.field(default_factory=list)

    def take(self, node: fx.Node, below: Any) -> None:
        """``node`` joins the kernel; the walk goes on at its input ``below``."""
        self.consumed.append(node)
        self.base = below


def _scale_mask_softmax_args(node: fx.Node) -> tuple:
    """``(x, scale, mask, dim, bias, fill, dtype, safe)`` of a ``tile::scale_mask_softmax``
    node, defaults filled in."""
    names = ("x", "scale", "mask", "dim", "bias", "fill", "dtype", "safe")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    defaults = {"dim": -1, "safe": False}
    return tuple(given.get(k, defaults.get(k)) for k in names)


def _softmax_call(n: fx.Node) -> tuple | None:
    """``(x, dim, half_to_float, safe)`` of a ``tile::softmax`` or ``tile::safe_softmax``
    node (``_safe_softmax``'s ``dtype``, as its check lets it be, is None, x's, or fp32
    for a half x); None for any other node."""
    tile = torch.ops.tile
    if n.op != "call_function":
        return None
    if n.target is tile.softmax.default:
        return (*n.args[:3], False)
    if n.target is tile.safe_softmax.default:
        x, dim = n.args[:2]
        dtype = n.args[2] if len(n.args) > 2 else n.kwargs.get("dtype")
        return x, dim, dtype is not None and dtype != _val(x).dtype, True
    return None


def _mask_mode(mask: Any, added: list) -> str:
    """The report's name for the prologue's mask operands."""
    parts = ["add"] * len(added) + (["fill"] if mask is not None else [])
    return "+".join(parts) or "none"


def _plain_add(n: Any) -> bool:
    """``n`` is a single-use ``add(a, t)`` of a tensor ``t``, alpha 1."""
    return (
        _single_use(n)
        and n.target is aten.add.Tensor
        and _is_tensor_node(n.args[1])
        and n.kwargs.get("alpha", 1) == 1
    )


def _dropout_grad(grad: fx.Node):
    """``(g, keep, c, absorbed nodes)`` when ``grad`` is a dropout's backward written
    out, ``mul(mul(g, c), keep)`` or ``mul(g, mul(keep[.to(float)], c))`` (either operand
    order) with a bool ``keep``; else None."""

    def is_bool(n):
        return _is_tensor_node(n) and _val(n).dtype == torch.bool

    def scaled(n, what):  # mul(x, c) with a single use and x accepted by what -> (x, c)
        if _single_use(n) and n.target is aten.mul.Tensor and isinstance(n.args[1], float):
            return (n.args[0], n.args[1]) if what(n.args[0]) else None
        return None

    def keep_of(n):  # keep, or keep cast to a float dtype -> (keep, [cast])
        if is_bool(n):
            return n, []
        if _single_use(n) and n.target in _CASTS and is_bool(n.args[0]):
            return n.args[0], [n]
        return None

    a, b = grad.args[:2]
    for k, m in ((a, b), (b, a)):
        if is_bool(k):  # mul(mul(g, c), keep)
            hit = scaled(m, _is_tensor_node)
            if hit is not None:
                return hit[0], k, hit[1], [m]
        hit = scaled(k, lambda n: keep_of(n) is not None)  # mul(g, mul(keep, c))
        if hit is not None and _is_tensor_node(m):
            keep, casts = keep_of(hit[0])
            return m, keep, hit[1], [k, *casts]
    return None


def _constant_fill(n: Any) -> float | None:
    """The value of a 0-dim constant tensor node (``full([], v)``, ``scalar_tensor(v)``),
    or of a plain number; None for anything else."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return float(n)
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    if n.target is aten.full.default and list(n.args[0]) == [] and len(n.args) > 1:
        v = n.args[1]
    elif n.target is aten.scalar_tensor.default:
        v = n.args[0]
    else:
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
