"""Fusion: grow each tile anchor into the pointwise ops around it, one kernel per region.

* **matmul epilogues** (not a fixed menu): from a ``tile::mm``/``tile::addmm`` (through the
  view a linear on N-d inputs adds), absorb every pointwise ATen op whose tensor inputs
  are in the region or are *extra inputs* that broadcast to the output; the region ends
  at one sink whose value leaves it.  An intermediate used outside the region must still
  be written, so it bounds the region.  The ops become one expression
  (``codegen.pointwise``) generated into ``tile::mm_epilogue``'s kernel.  When no such
  closed region exists (a training forward returns the GEMM result and intermediates the
  backward saves), ``tile::mm_epilogue_multi``'s kernel computes the whole region and
  writes the sink and up to four of those values too.
* **dual GEMM epilogues**: two GEMMs of one ``a`` (same weight shape) whose results are
  used only by one pointwise region, like SwiGLU's ``silu(x @ W1) * (x @ W3)``, become
  ``tile::dual_mm_epilogue`` (one kernel, two accumulators: ``ACC`` and ``ACC1`` of the
  expression).  Tried first; when a result escapes the region (training graphs save both
  for the backward) the single-GEMM epilogue applies as before.
* **sums of GEMMs**: an extra input that is a plain GEMM result the epilogue only adds to
  the accumulator (a backward's ``dq @ Wq + dk @ Wk + dv @ Wv``) runs in the same kernel
  as a term of ``tile::mm_sum_epilogue`` (:mod:`.fusion_sum`).
* **grouped GEMMs**: the plain GEMMs left that share their ``a`` (attention's query, key
  and value linears) become one ``tile::grouped_mm`` launch (:mod:`.fusion_grouped`).
* **softmax prologues**: ``softmax(x * scale + mask)`` (and ``/ s``, ``masked_fill(mask,
  -inf)``, MPT's ``(x * scale + bias).masked_fill(mask, finfo.min)``, T5's
  ``x + position_bias + mask``, the ``where`` forms) become ``tile::scale_mask_softmax``.
* **dropout after a softmax**: ``native_dropout`` or Inductor's decomposition of it (its
  seed op kept) become ``tile::scale_mask_softmax_dropout``; in backward graphs the
  dropout's backward and the prologue's scale fold into
  ``tile::scale_mask_softmax_backward``.
* **dropout after a GEMM**: each training dropout is first written as pointwise ops over
  ``tile::dropout_keep`` (:mod:`.fusion_dropout`), so the matmul epilogue absorbs it;
  the ones that did not fuse are put back afterwards.
* **residual add + norm**: ``layer_norm(x + r)`` / ``rms_norm(x + r)`` become
  ``tile::add_layer_norm`` / ``tile::add_rms_norm``, which also write the sum when it is
  used later.
* **norm epilogues**: the pointwise ops after a layer / RMS norm (adaLN's modulation, a
  cast, an activation) grow as a GEMM's epilogue does into ``tile::norm_epilogue``
  (:mod:`.fusion_norm`).

It runs on graphs whose autograd is already done (inference, and the partitioned forward
and backward graphs), after the anchors were replaced by the rewrite.  The matmul passes
live in :mod:`.fusion_matmul`, the softmax ones in :mod:`.fusion_softmax`, the dropout
lowering in :mod:`.fusion_dropout`, the grouped GEMMs in :mod:`.fusion_grouped`, the shared
base in :mod:`.fusion_core`; this module holds the norm pass and the order they run in.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..codegen.fused_norm import broadcasts_over_leading_dims
from ..report import GraphReport, Replacement, describe_value, short_target
from . import layout
from .fusion_core import _is_tensor_node, _val, aten
from .fusion_dropout import DropoutLowering
from .fusion_grouped import GroupedGemms
from .fusion_norm import NormEpilogues
from .fusion_softmax import SoftmaxFusions


class _Fuser(GroupedGemms, NormEpilogues, SoftmaxFusions, DropoutLowering):
    # --- residual add + norm -----------------------------------------------------------

    def _repeats(self, small, big, k: int) -> bool:
        """The residual broadcast ``tile::add_*_norm`` takes, proven for every size."""
        return broadcasts_over_leading_dims(
            small, big, k, same=lambda a, b: self.facts.prove_eq(a, b) is True
        )

    def _rows_view(self, node, k: int) -> fx.Node | None:
        """``node`` when it is a view of an add that keeps the last ``k`` (normalized)
        dims: the norm of the view is the norm of the add, its rows regrouped."""
        if not (
            isinstance(node, fx.Node)
            and node.target in (aten.view.default, aten._unsafe_view.default)
            and isinstance(node.args[0], fx.Node)
            and node.args[0].target is aten.add.Tensor
            and isinstance(node.args[1], (list, tuple))
        ):
            return None
        before, after = _val(node.args[0]).shape, _val(node).shape
        if min(len(before), len(after)) < k or not self._same(before[-k:], after[-k:]):
            return None
        if any(not isinstance(d, int) for d in node.args[1][-k:]):
            return None  # (the stats' shape is the view's leading dims + ones)
        return node

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
            k = len(norm.args[1])
            view = self._rows_view(s, k)  # OPT: (residual + h).view(shape) -> the norm
            if view is not None:
                s = view.args[0]
            if not (isinstance(s, fx.Node) and s.target is aten.add.Tensor and len(s.args) == 2):
                continue
            x, r = s.args
            if not (_is_tensor_node(x) and _is_tensor_node(r)) or s.kwargs.get("alpha", 1) != 1:
                self._note(norm, f"{s.name} is not a sum of two tensors (a scalar, or alpha)")
                continue
            vx, vr, vs = _val(x), _val(r), _val(s)
            if self._same(vr.shape, vs.shape) and not self._same(vx.shape, vs.shape):
                x, r, vx, vr = r, x, vr, vx  # the full-size operand is x
            if not (
                self._same(vx.shape, vs.shape)
                and (self._same(vx.shape, vr.shape) or self._repeats(vr.shape, vx.shape, k))
            ):
                shapes_ = f"{list(vx.shape)} + {list(vr.shape)}"
                self._note(norm, f"{s.name} adds {shapes_}: not a residual of the rows' shape")
                continue
            if not vx.dtype == vr.dtype == vs.dtype:
                dtypes = f"{vx.dtype} + {vr.dtype} -> {vs.dtype}"
                self._note(norm, f"{s.name} adds {dtypes}: mixed dtypes are not fused")
                continue
            order = self._order()
            params = [a for a in norm.all_input_nodes if a is not s and a is not view]
            # the sum may be read before the norm: compute both where the add was
            at = s if all(order[p] < order[s] for p in params) else norm
            readers = [u for u in s.users if u is not norm]
            if at is norm and (view is not None or any(order[u] < order[norm] for u in readers)):
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
                self._note(norm, "its saved statistics' dtype differs from the fused kernel's")
                continue
            for u in list(norm.users):
                if u.target is operator.getitem:
                    with self.graph.inserting_before(u):
                        g = self.graph.call_function(operator.getitem, (fused, remap[u.args[1]]))
                        self._meta(g)
                        if view is not None:  # back to the rows the norm saw
                            shape = list(view.args[1])
                            shape = shape if u.args[1] == 0 else shape[:-k] + [1] * k
                            g = self.graph.call_function(aten.view.default, (g, shape))
                            self._meta(g)
                    u.replace_all_uses_with(g)
                    self.graph.erase_node(u)
            if norm.users:
                raise RuntimeError(f"unexpected users of {norm.name}")
            self.graph.erase_node(norm)
            s.replace_all_uses_with(total)
            self.graph.erase_node(s)
            if view is not None and not view.users:
                self.graph.erase_node(view)
            if not total.users:
                self.graph.erase_node(total)
            self.count += 1
            through = [view] if view is not None else []
            self.report.replacements.append(
                Replacement(
                    pattern=f"fused_add_{'layer' if 'layer' in str(fused_op) else 'rms'}_norm",
                    nodes=[s.name, *(v.name for v in through), norm.name],
                    targets=[
                        "add.Tensor",
                        *(short_target(v.target) for v in through),
                        short_target(norm.target),
                    ],
                    inputs={"x": describe_value(vx), "residual": describe_value(vr)},
                    scalars={},
                )
            )


def fuse(gm: fx.GraphModule, report: GraphReport) -> int:
    """Run every fusion on ``gm`` in place; return how many regions were fused."""
    from ..codegen import (  # noqa: F401  (registers the ops)
        dropout,
        dual_matmul,
        fused_matmul,
        fused_matmul_multi,
        fused_matmul_sum,
        fused_norm,
        fused_softmax,
        fused_softmax_dropout,
        grouped_matmul,
        norm_epilogue,
    )

    before = layout.snapshot(gm.graph)
    undone = layout.undo(gm, report.notes)  # (readers' inputs now differ from ``before``)
    f = _Fuser(gm, report)
    f.residual_norms()
    f.softmax_prologues()  # (first: a scale between a norm and a softmax is the softmax's)
    f.softmax_dropouts()
    f.softmax_backwards()
    f.norm_epilogues()  # (before the dropouts become pointwise ops: no rand in a norm's)
    f.lower_dropouts()  # keep masks as pointwise ops: they fuse into GEMM epilogues
    f.split_gemms()  # a gate_up GEMM chunked in two: two GEMMs of W's halves
    f.transposed_gemms()  # t(a @ b) with pointwise users: b.t() @ a.t()
    f.dual_matmul_epilogues()  # first: a SwiGLU pair wins over one GEMM's epilogue
    f.matmul_epilogues()
    f.grouped_gemms()  # last: the GEMMs no epilogue took, sharing an input
    f.restore_dropouts()  # where a lowered dropout did not fuse
    f.merge_seeds()  # one randint for all the seeds the fused ops draw with
    if f.count or f.touched or undone:
        layout.restore(gm, before, report.notes, outputs=report.name != "backward")
        gm.graph.lint()
        gm.recompile()
    return f.count
