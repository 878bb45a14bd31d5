"""Residual add + LayerNorm / RMSNorm in one pass: ``sum = x + residual`` (written, for the
next residual) and ``out = norm(sum)``, plus the ``tile::add_layer_norm`` /
``tile::add_rms_norm`` custom ops.

One kernel serves both norms (``RMS`` constexpr).  Layout as :mod:`.layer_norm`: ``[M, N]``
rows (N = prod(normalized_shape)) with a row stride and column stride 1 for ``x`` and
``residual`` (else a contiguous copy); ``out`` and ``sum`` are contiguous.  ``sum`` is
rounded to the input dtype *before* the statistics are taken, so the kernel normalises
exactly the tensor eager's ``layer_norm(x + residual)`` sees (and the saved ``sum`` is what
the backward differentiates).  Mean / rstd are fp32, shaped ``x.shape[:axis] + (1,) * k``.

Backward reuses ``tile::layer_norm_backward`` / ``tile::rms_norm_backward`` on ``sum`` and
adds the incoming gradient of ``sum``; ``x`` and ``residual`` get the same gradient.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _common, plans
from . import rms_norm as _rms
from .autotune import Config
from .layer_norm import (
    ROW_CONFIGS,
    _prod,
    as_rows,
    check_layer_norm,
    compile_spec,
    pick_config,
    signature,
    stats_shape,
)

__all__ = [
    "add_norm_fwd",
    "check_add_layer_norm",
    "check_add_rms_norm",
    "sm90_specs",
]

KERNEL_NAMES = ("add_layer_norm_fwd", "add_rms_norm_fwd")


@triton.jit
def _add_norm_fwd_kernel(
    X,  # *T [M, N]: row stride stride_x, column stride 1
    R,  # *T [R_ROWS, N] residual (row i of x adds row i % R_ROWS): row stride stride_r
    Y,  # *T [M, N] normalised output, contiguous
    S,  # *T [M, N] x + residual, contiguous
    W,  # *T [N] weight (read only if HAS_WEIGHT)
    B,  # *T [N] bias (read only if HAS_BIAS; never with RMS)
    Mean,  # *fp32 [M] (written unless RMS)
    Rstd,  # *fp32 [M]
    stride_x,
    stride_r,
    R_ROWS,  # rows of the residual: M, or fewer when it broadcasts over leading dims
    N,
    eps,  # fp32
    RMS: tl.constexpr,  # RMS norm (no mean) instead of layer norm
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the row in registers
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    R += (row % R_ROWS) * stride_r
    Y += row * N
    S += row * N
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + cols, s, mask=mask)
        s = s.to(tl.float32)
        if RMS:
            mean = 0.0
            diff = s
        else:
            mean = tl.sum(s, axis=0) / N
            diff = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / N + eps)
        y = diff * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: write the sum; per-lane Welford (layer norm) or sum of squares (RMS)
        cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
        lane_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
        lane_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
            s16 = (x + r).to(S.dtype.element_ty)
            tl.store(S + cols, s16, mask=mask)
            s = s16.to(tl.float32)
            if RMS:
                lane_m2 += s * s
            else:
                new_cnt = cnt + tl.where(mask, 1.0, 0.0)
                delta = s - lane_mean
                lane_mean += tl.where(mask, delta / tl.maximum(new_cnt, 1.0), 0.0)
                lane_m2 += tl.where(mask, delta * (s - lane_mean), 0.0)
                cnt = new_cnt
        if RMS:
            mean = 0.0
            var = tl.sum(lane_m2, axis=0) / N
        else:
            mean = tl.sum(lane_mean * cnt, axis=0) / N
            d = lane_mean - mean
            var = tl.sum(lane_m2 + cnt * d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        # pass 2: normalise (the sum is recomputed from x and residual: no read-after-write)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty).to(tl.float32)
            y = (s - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _add_norm_rows_kernel(
    X,  # *T [M, N]: row stride stride_x, column stride 1
    R,  # *T [R_ROWS, N] residual (row i of x adds row i % R_ROWS): row stride stride_r
    Y,  # *T [M, N] normalised output, contiguous
    S,  # *T [M, N] x + residual, contiguous
    W,  # *T [N] weight (read only if HAS_WEIGHT)
    B,  # *T [N] bias (read only if HAS_BIAS; never with RMS)
    Mean,  # *fp32 [M] (written unless RMS)
    Rstd,  # *fp32 [M]
    M,
    stride_x,
    stride_r,
    R_ROWS,  # rows of the residual (see above)
    N,
    eps,  # fp32
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= N: each row in registers
    ROWS: tl.constexpr,  # rows per program (short rows: fewer, fuller programs)
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    r = tl.load(R + (rows % R_ROWS)[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
    s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
    tl.store(S + rows[:, None] * N + cols[None, :], s, mask=mask)
    s = s.to(tl.float32)
    if RMS:
        diff = s  # (masked lanes are 0)
    else:
        mean = tl.sum(s, axis=1) / N
        diff = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    y = diff * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


#: Several short rows per program (the row in registers): for many rows of at most
#: 1024 elements (GPT-2 / BERT's 768), fewer and fuller programs.  Timed beside the
#: one-row configs; the heuristic stays one row per program.
ROWS_CONFIGS: tuple[Config, ...] = tuple(
    Config.make(num_warps=w, num_stages=1, BLOCK_N=1024, ROWS=r)
    for r, w in ((2, 4), (4, 8), (8, 8))
)
MANY_ROWS = 2048  # below this, every row gets its own program (parallelism first)
_CONFIGS: tuple[Config, ...] = ROW_CONFIGS + ROWS_CONFIGS


def _space(m: int, n: int) -> tuple[Config, ...]:
    """The configs for ``m`` rows of ``n``: multi-row ones only for many short rows."""
    many = m >= MANY_ROWS
    return tuple(c for c in _CONFIGS if c.get("ROWS", 1) == 1 or (many and n <= c["BLOCK_N"]))


# --- host --------------------------------------------------------------------------------


def _pair_reason(x, residual, normalized_shape) -> str | None:
    if not isinstance(residual, torch.Tensor):
        return "residual is not a tensor"
    if residual.shape != x.shape and not broadcasts_over_leading_dims(
        residual.shape, x.shape, len(normalized_shape)
    ):
        return (
            f"residual shape {tuple(residual.shape)} is neither x's {tuple(x.shape)} nor "
            "a broadcast of it over leading dims"
        )
    if residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} != x dtype {x.dtype}"
    if residual.device != x.device:
        return f"residual on {residual.device}, x on {x.device}"
    return None


def broadcasts_over_leading_dims(small, big, k: int, same=operator.eq) -> bool:
    """Whether a residual of shape ``small`` adds to ``big`` by repeating whole trailing
    blocks: ``small`` is (after leading 1s) a suffix of ``big`` that spans at least the
    ``k`` normalized dims (BERT's position embeddings ``[1, S, H]`` on ``[B, S, H]``).
    ``same(a, b)`` compares two sizes (the fusion pass proves it for symbolic ones)."""
    small, big = list(small), list(big)
    while len(small) > k and same(small[0], 1):
        small.pop(0)
    n = len(small)
    return k <= n <= len(big) and all(map(same, small, big[len(big) - n :]))


@_common.memo_reason
def check_add_layer_norm(x, residual, normalized_shape, weight=None, bias=None) -> str | None:
    """Why ``add_layer_norm`` cannot use the tile kernel, or None."""
    return check_layer_norm(x, normalized_shape, weight, bias) or _pair_reason(
        x, residual, normalized_shape
    )


@_common.memo_reason
def check_add_rms_norm(x, residual, normalized_shape, weight=None) -> str | None:
    """Why ``add_rms_norm`` cannot use the tile kernel, or None."""
    return _rms.check_rms_norm(x, normalized_shape, weight) or _pair_reason(
        x, residual, normalized_shape
    )


def add_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, sum, mean, rstd)``: ``sum = x + residual``, ``out = norm(sum)`` (RMS norm
    when ``rms``: then ``mean`` is an empty placeholder and ``bias`` must be None)."""
    if rms:
        reason = check_add_rms_norm(x, residual, normalized_shape, weight)
        if bias is not None:
            reason = reason or "RMS norm has no bias"
    else:
        reason = check_add_layer_norm(x, residual, normalized_shape, weight, bias)
    if reason:
        raise ValueError(f"add_norm_fwd: {reason}")
    n = _prod(normalized_shape)
    m = x.numel() // n
    sshape = stats_shape(x, normalized_shape)
    out = _common.empty(x.shape, x.dtype, x.device)
    total = _common.empty(x.shape, x.dtype, x.device)
    mean = _common.empty((0,) if rms else sshape, torch.float32, x.device)
    rstd = _common.empty(sshape, torch.float32, x.device)
    if m == 0:
        return out, total, mean, rstd
    x2, stride_x = as_rows(x, m, n)
    r_rows = residual.numel() // n  # (m, or fewer when the residual broadcasts)
    r2, stride_r = as_rows(residual, r_rows, n)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2

    def run(cfg: Config):
        rows = cfg.get("ROWS", 1)
        if rows > 1:
            assert n <= cfg["BLOCK_N"], (n, cfg)
            _common.launch(_add_norm_rows_kernel, (_common.cdiv(m, rows),),
                x2, r2, out, total, w, b, rstd if rms else mean, rstd,
                m, stride_x, stride_r, r_rows, n, float(eps),
                RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                **cfg.as_kwargs(),
            )  # fmt: skip
            return
        _common.launch(_add_norm_fwd_kernel, (m,),
            x2, r2, out, total, w, b, rstd if rms else mean, rstd,
            stride_x, stride_r, r_rows, n, float(eps),
            RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            SINGLE_BLOCK=cfg["BLOCK_N"] >= n, **cfg.as_kwargs(),
        )  # fmt: skip

    name = "add_rms_norm_fwd" if rms else "add_layer_norm_fwd"
    key = (x.dtype, weight is not None, bias is not None, m >= MANY_ROWS)
    fns = (_add_norm_fwd_kernel, _add_norm_rows_kernel)
    run(pick_config(name, _space(m, n), n, key, run, config, fn=fns))
    return out, total, mean, rstd


# --- fallbacks ------------------------------------------------------------------------------


def _eager_ln(x, residual, ns, weight, bias, eps):
    s = x + residual
    out, mean, rstd = torch.ops.aten.native_layer_norm(s, ns, weight, bias, eps)
    return out.contiguous(), s.contiguous(), mean.to(torch.float32), rstd.to(torch.float32)


def _eager_rms(x, residual, ns, weight, eps):
    s = x + residual
    out, rstd = _rms._aten_fwd(s, ns, weight, eps)
    return out, s.contiguous(), rstd.to(torch.float32)


# --- custom ops -----------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::add_layer_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
    "float eps) -> (Tensor, Tensor, Tensor, Tensor)",
)
@plans.planned("tile::add_layer_norm")
def add_layer_norm_op(x, residual, normalized_shape, weight, bias, eps):
    """``(out, sum, mean, rstd)``: ``sum = x + residual``, ``out = layer_norm(sum)``."""
    ns = [int(v) for v in normalized_shape]
    return _common.guarded_op(
        "add_layer_norm_fwd",
        check_add_layer_norm(x, residual, ns, weight, bias),
        key=(x.dtype, weight is not None, bias is not None),
        run=lambda: add_norm_fwd(x, residual, ns, weight, bias, eps, rms=False),
        fallback=lambda: _eager_ln(x, residual, ns, weight, bias, eps),
    )


@add_layer_norm_op.register_fake
def _(x, residual, normalized_shape, weight, bias, eps):
    sshape = stats_shape(x, normalized_shape)
    stats = x.new_empty(sshape, dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape),
        stats,
        x.new_empty(sshape, dtype=torch.float32),
    )


@torch.library.custom_op(
    "tile::add_rms_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, float? eps) "
    "-> (Tensor, Tensor, Tensor)",
)
@plans.planned("tile::add_rms_norm")
def add_rms_norm_op(x, residual, normalized_shape, weight, eps):
    """``(out, sum, rstd)``: ``sum = x + residual``, ``out = rms_norm(sum)``."""
    ns = [int(v) for v in normalized_shape]
    e = _rms.default_eps(x.dtype) if eps is None else eps

    def run():
        out, total, _mean, rstd = add_norm_fwd(x, residual, ns, weight, None, e, rms=True)
        return out, total, rstd

    return _common.guarded_op(
        "add_rms_norm_fwd",
        check_add_rms_norm(x, residual, ns, weight),
        key=(x.dtype, weight is not None),
        run=run,
        fallback=lambda: _eager_rms(x, residual, ns, weight, eps),
    )


@add_rms_norm_op.register_fake
def _(x, residual, normalized_shape, weight, eps):
    sshape = stats_shape(x, normalized_shape)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(sshape, dtype=torch.float32)


def _plus(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _ln_setup(ctx, inputs, output):
    _x, r, ns, weight, bias, _eps = inputs
    _out, total, mean, rstd = output
    ctx.ns = list(ns)
    ctx.residual_shape = r.shape
    ctx.save_for_backward(total, weight, bias, mean, rstd)


def _ln_backward(ctx, g_out, g_sum, _g_mean, _g_rstd):
    total, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_s = need[0] or need[1]
    mask = [need_s, need[3] and weight is not None, need[4] and bias is not None]
    ds = dw = db = None
    if g_out is not None and any(mask):
        dx, dw, db = torch.ops.tile.layer_norm_backward(
            g_out, total, ctx.ns, mean, rstd, weight, bias, mask
        )
        ds = dx if mask[0] else None
    ds = _plus(ds, g_sum) if need_s else None
    return (
        ds if need[0] else None,
        ds.sum_to_size(ctx.residual_shape) if need[1] else None,
        None,
        dw if mask[1] else None,
        db if mask[2] else None,
        None,
    )


def _rms_setup(ctx, inputs, output):
    _x, r, ns, weight, _eps = inputs
    _out, total, rstd = output
    ctx.ns = list(ns)
    ctx.residual_shape = r.shape
    ctx.save_for_backward(total, weight, rstd)


def _rms_backward(ctx, g_out, g_sum, _g_rstd):
    total, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_s = need[0] or need[1]
    mask = [need_s, need[3] and weight is not None]
    ds = dw = None
    if g_out is not None and any(mask):
        dx, dw = torch.ops.tile.rms_norm_backward(g_out, total, ctx.ns, rstd, weight, mask)
        ds = dx if mask[0] else None
    ds = _plus(ds, g_sum) if need_s else None
    dr = ds.sum_to_size(ctx.residual_shape) if need[1] else None
    return ds if need[0] else None, dr, None, dw if mask[1] else None, None


torch.library.register_autograd("tile::add_layer_norm", _ln_backward, setup_context=_ln_setup)
torch.library.register_autograd("tile::add_rms_norm", _rms_backward, setup_context=_rms_setup)


# --- sm_90 compile specs --------------------------------------------------------------------


def sm90_specs() -> list[dict]:
    """Every (norm, dtype, config, single/looped) variant, with weight (and bias)."""
    specs = []
    for dt in _common.SUPPORTED_DTYPES:
        t = "*" + _common.triton_dtype_name(dt)
        sig = signature(
            t,
            "X:T R:T Y:T S:T W:T B:T Mean:*fp32 Rstd:*fp32 stride_x:i32 stride_r:i32 R_ROWS:i32 "
            "N:i32 eps:fp32",
        )
        rows_sig = signature(
            t,
            "X:T R:T Y:T S:T W:T B:T Mean:*fp32 Rstd:*fp32 M:i32 stride_x:i32 stride_r:i32 "
            "R_ROWS:i32 N:i32 eps:fp32",
        )
        for rms in (False, True):
            kind = "rms" if rms else "layer"
            for cfg in ROWS_CONFIGS:
                specs.append(
                    compile_spec(
                        f"add_{kind}_norm_rows[{t[1:]},{cfg}]",
                        _add_norm_rows_kernel,
                        cfg,
                        dict(rows_sig),
                        {
                            "RMS": rms,
                            "HAS_WEIGHT": True,
                            "HAS_BIAS": not rms,
                            "BLOCK_N": cfg["BLOCK_N"],
                            "ROWS": cfg["ROWS"],
                        },
                    )
                )
            for cfg in ROW_CONFIGS:
                for single in (True, False):
                    kind = "rms" if rms else "layer"
                    specs.append(
                        compile_spec(
                            f"add_{kind}_norm_fwd[{t[1:]},{cfg},single={single}]",
                            _add_norm_fwd_kernel,
                            cfg,
                            dict(sig),
                            {
                                "RMS": rms,
                                "HAS_WEIGHT": True,
                                "HAS_BIAS": not rms,
                                "BLOCK_N": cfg["BLOCK_N"],
                                "SINGLE_BLOCK": single,
                            },
                        )
                    )
    return specs
