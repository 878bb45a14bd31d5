"""Norm epilogues (see :mod:`.fusion`): the pointwise ops after a ``tile::layer_norm`` /
``tile::rms_norm`` output generated into one ``tile::norm_epilogue`` kernel.

DiT's adaLN ``norm(x) * (1 + scale[:, None]) + shift[:, None]``, a cast or an activation
after a norm: grown as a GEMM's epilogue is (:meth:`MatmulFusions._grow`), from the norm's
output.  When the output or an intermediate is also read elsewhere (a training forward
saves the normalised value for the modulation's gradient), the kernel writes those too.
The norm's statistics come out of the same kernel.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..report import Replacement, describe_value, short_target
from . import shapes
from .fusion_core import _val
from .fusion_matmul import MatmulFusions


class NormEpilogues(MatmulFusions):
    def norm_epilogues(self) -> None:
        """Fuse each norm's pointwise users into ``tile::norm_epilogue``, or note why not."""
        from ..codegen import pointwise
        from ..codegen import pointwise_aten as pa

        tile = torch.ops.tile
        norms = (
            tile.layer_norm.default,
            tile.rms_norm.default,
            tile.add_layer_norm.default,
            tile.add_rms_norm.default,
        )
        for norm in list(self.graph.nodes):
            if norm.op != "call_function" or norm.target not in norms:
                continue
            outs = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
            y = outs.get(0)
            if y is None or not any(
                u.op == "call_function" and pa.is_pointwise(u.target) for u in y.users
            ):
                continue
            why = self._fuse_norm(norm, y, outs, pointwise)
            if why:
                self._note(norm, f"norm epilogue not fused: {why}")

    def _fuse_norm(self, norm, y, outs, pointwise) -> str | None:
        from ..codegen import norm_epilogue

        tile = torch.ops.tile
        rms = norm.target in (tile.rms_norm.default, tile.add_rms_norm.default)
        args = list(norm.args)
        residual = None
        if norm.target in (tile.add_layer_norm.default, tile.add_rms_norm.default):
            residual = args.pop(1)  # (outputs: out, sum, stats)
        if rms:
            x, ns, weight, eps = args[:4]
            bias = None
        else:
            x, ns, weight, bias, eps = args[:5]
        region, sink, _, why = self._grow([y], pointwise)
        if sink is None:  # open (``region`` is all grown): values read elsewhere are written
            if not region:
                return why
            sink = region[-1]
        members = self._ancestors_within(sink, set(region)) | {sink}
        kept = [n for n in region if n in members]
        outputs = [y] if set(y.users) - members else []
        outputs += [n for n in kept if n is not sink and set(n.users) - members]
        if 1 + len(outputs) > norm_epilogue.MAX_OUTPUTS:
            return f"{len(outputs)} values of the region are used outside it"
        written = [sink, *outputs]
        try:
            exprs, leaves = self._expressions(
                [y], kept, written, self._leaves([y], kept), pointwise
            )
        except pointwise.ExprError as e:
            return f"epilogue not expressible: {e}"
        exprs_s = [pointwise.dumps(e) for e in exprs]
        if exprs_s == ['"ACC"'] and _val(sink).dtype == _val(y).dtype:
            # copies only (an eval-mode dropout's clone): the norm's fresh result is it
            sink.replace_all_uses_with(y)
            self._erase_unused(kept)
            self.touched = True
            return None
        hinted = [
            shapes.hinted(_val(t)) if isinstance(t, fx.Node) else None
            for t in (x, residual, weight, bias)
        ]
        ex_vals = [shapes.hinted(_val(e)) for e in leaves]
        ns_hint = [int(shapes.hint(_val(d))) if isinstance(d, fx.Node) else d for d in ns]
        reason = norm_epilogue.check(
            hinted[0], hinted[1], ns_hint, hinted[2], hinted[3], rms, ex_vals, exprs_s
        )
        if reason is not None:
            return reason
        from ..codegen import epilogue_host

        ldt = epilogue_host.leaf_dtypes(hinted[0], ex_vals)
        for n, e in zip(written, exprs):
            if pointwise.infer_dtype(e, ldt) != _val(n).dtype:
                return f"{n.name}'s dtype {_val(n).dtype} is not its expression's"
        # the fused op replaces the norm: what it reads must exist there (an extra read
        # from the norm's sum or statistics cannot)
        why = self._hoist_inputs([t for t in leaves if isinstance(t, fx.Node)], norm)
        if why:
            return f"an extra input cannot move before the norm: {why}"
        graph = self.graph
        with graph.inserting_before(norm):
            fused = graph.call_function(
                torch.ops.tile.norm_epilogue.default,
                (x, residual, ns, weight, bias, eps, rms, list(leaves), exprs_s),
            )
            self._meta(fused)
            news = []
            rest = (1 if residual is not None else 0) + (1 if rms else 2)
            for i in range(len(written) + rest):
                g = graph.call_function(operator.getitem, (fused, i))
                self._meta(g)
                news.append(g)
        for n, new in zip(written, news):
            n.replace_all_uses_with(new)
        # the norm's other outputs (the sum, the statistics) in the same order after them
        for k, new in enumerate(news[len(written) :], start=1):
            if k in outs:
                outs[k].replace_all_uses_with(new)
        self._erase_unused([*kept, *outs.values(), norm])
        self._erase_unused(news)
        self.count += 1
        self.report.replacements.append(
            Replacement(
                pattern="fused_norm_epilogue",
                nodes=[norm.name, *(n.name for n in kept)],
                targets=[short_target(norm.target), *(short_target(n.target) for n in kept)],
                inputs={"x": describe_value(_val(x))},
                scalars={
                    "expr": exprs_s[0],
                    **({"also_writes": [n.name for n in outputs]} if outputs else {}),
                },
            )
        )
        return None
