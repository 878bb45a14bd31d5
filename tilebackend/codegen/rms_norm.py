"""RMSNorm forward / backward as Triton tile kernels (after Liger Kernel's
``ops/rms_norm.py``), plus the ``tile::rms_norm`` / ``tile::rms_norm_backward`` custom
ops that mirror ``aten._fused_rms_norm`` / ``aten._fused_rms_norm_backward``.

``out = x * rsqrt(mean(x^2 over the normalized dims) + eps) * weight``, all math in fp32
(as ATen's decomposition: upcast, normalize, multiply by the weight, cast back), ``out``
in the input dtype, ``rstd`` in fp32 with shape ``x.shape[:axis] + (1,) * len(ns)``.
``eps=None`` means ``torch.finfo(float32).eps`` for fp32 / fp16 / bf16 inputs (ATen uses
the epsilon of the *opmath* type, not of the input dtype).

Layout and kernel structure are those of :mod:`.layer_norm`: ``[M, N]`` rows with a row
stride and column stride 1 (else the launcher makes the input contiguous), one program
per row forward; backward dx per row with register-resident dW partial sums per row
block (``SINGLE_BLOCK``) or a separate column-block dW kernel when the row is longer
than one block.  ``[programs, N]`` fp32 partials are summed on the host.  No atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _common, plans
from .autotune import Config
from .layer_norm import (
    ROW_CONFIGS,
    _prod,
    as_rows,
    compile_spec,
    fill_masked,
    grad_out_reason,
    partial_buf,
    partial_grid,
    pick_config,
    shape_reason,
    signature,
    stats_shape,
    sum_partials,
)

__all__ = [
    "check_rms_norm",
    "default_eps",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "sm90_specs",
]

# --- kernels -----------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # *T    [M, N] input rows: row stride stride_x, column stride 1
    Y,  # *T    [M, N] output, contiguous
    W,  # *T    [N] weight (read only if HAS_WEIGHT)
    Rstd,  # *fp32 [M] per-row 1 / sqrt(mean(x^2) + eps) (written)
    stride_x,  # int: elements between consecutive rows of X
    N,  # int: normalized size (columns per row)
    eps,  # fp32
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns handled per step
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the whole row lives in registers
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * N
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * w
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            x = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                y = y * w
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # *T    [M, N] grad of the output: row stride stride_dy, column stride 1
    X,  # *T    [M, N] forward input: row stride stride_x, column stride 1
    W,  # *T    [N] weight (read only if HAS_WEIGHT)
    Rstd,  # *fp32 [M] per-row rstd from the forward
    DX,  # *T    [M, N] grad of the input, contiguous (written if COMPUTE_DX)
    DW_part,  # *fp32 [programs, N] per-program sum of dy * x * rstd (SINGLE_BLOCK and COMPUTE_DW)
    stride_dy,  # int: elements between rows of DY
    stride_x,  # int: elements between rows of X
    M,  # int: rows
    N,  # int: normalized size
    rows_per_program,  # int: rows handled by one program (a contiguous block)
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # only honoured with SINGLE_BLOCK (else the dw kernel)
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N
):
    # dx = rstd * (w*dy - xhat * mean(xhat * w*dy)),  xhat = x * rstd
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    start64 = row_start.to(tl.int64)
    X += start64 * stride_x
    DY += start64 * stride_dy
    DX += start64 * N
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            xhat = x * rstd
            if COMPUTE_DX:
                wdy = dy
                if HAS_WEIGHT:
                    wdy = dy * w
                c1 = tl.sum(xhat * wdy, axis=0) / N
                dx = (wdy - xhat * c1) * rstd
                tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            X += stride_x
            DY += stride_dy
            DX += N
        if COMPUTE_DW:
            tl.store(DW_part + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            c1_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = dy
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    wdy = dy * w
                c1_acc += x * rstd * wdy
            c1 = tl.sum(c1_acc, axis=0) / N
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = dy
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    wdy = dy * w
                dx = (wdy - x * rstd * c1) * rstd
                tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
            X += stride_x
            DY += stride_dy
            DX += N


@triton.jit
def _rms_norm_bwd_dw_kernel(
    DY,  # *T    [M, N] grad of the output: row stride stride_dy, column stride 1
    X,  # *T    [M, N] forward input: row stride stride_x, column stride 1
    Rstd,  # *fp32 [M] per-row rstd
    DW_part,  # *fp32 [row_programs, N] partial sum of dy * x * rstd
    stride_dy,  # int: elements between rows of DY
    stride_x,  # int: elements between rows of X
    M,  # int: rows
    N,  # int: normalized size
    rows_per_program,  # int: rows summed by one program
    BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), row_programs)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    start64 = row_start.to(tl.int64)
    X += start64 * stride_x
    DY += start64 * stride_dy
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(row_start, row_end):
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        acc += dy * (x * rstd)
        X += stride_x
        DY += stride_dy
    tl.store(DW_part + pid_m.to(tl.int64) * N + cols, acc, mask=mask)


# --- tuning space ------------------------------------------------------------------

_FWD_CONFIGS: tuple[Config, ...] = ROW_CONFIGS
_BWD_CONFIGS: tuple[Config, ...] = ROW_CONFIGS


# --- host ----------------------------------------------------------------------------


def default_eps(dtype: torch.dtype) -> float:
    """ATen's eps when ``eps=None``: the epsilon of the opmath type (fp32 for halves)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _rstd_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_common.memo_reason
def check_rms_norm(
    x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None
) -> str | None:
    """Why the tile kernels cannot take this RMS norm (None when they can)."""
    if r := _common.device_reason(x):
        return r
    if r := _common.dtype_reason(x):
        return r
    return shape_reason(x, normalized_shape, ("weight", weight))


def rms_norm_fwd(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    eps: float | None,
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, rstd)`` like ``aten._fused_rms_norm``.  ``config`` forces a config."""
    reason = check_rms_norm(x, normalized_shape, weight)
    if reason:
        raise ValueError(f"rms_norm_fwd: {reason}")
    if eps is None:
        eps = default_eps(x.dtype)
    n = _prod(normalized_shape)
    m = x.numel() // n
    out = _common.empty(x.shape, x.dtype, x.device)
    rstd = _common.empty(stats_shape(x, normalized_shape), torch.float32, x.device)
    if m == 0:
        return out, rstd
    x2, stride_x = as_rows(x, m, n)
    w = weight.contiguous() if weight is not None else x2

    def run(cfg: Config):
        _common.launch(
            _rms_norm_fwd_kernel,
            (m,),
            x2,
            out,
            w,
            rstd,
            stride_x,
            n,
            float(eps),
            HAS_WEIGHT=weight is not None,
            SINGLE_BLOCK=cfg["BLOCK_N"] >= n,
            **cfg.as_kwargs(),
        )

    run(pick_config("rms_norm_fwd", _FWD_CONFIGS, n, (x.dtype, weight is not None), run, config))
    return out, rstd


def rms_norm_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    output_mask: Sequence[bool],
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dw)`` like ``aten._fused_rms_norm_backward``; an entry is None when its
    mask is False (or dw when weight is None)."""
    reason = check_rms_norm(x, normalized_shape, weight) or grad_out_reason(grad_out, x)
    if reason:
        raise ValueError(f"rms_norm_bwd: {reason}")
    n = _prod(normalized_shape)
    m = x.numel() // n
    want_dx = bool(output_mask[0])
    want_dw = bool(output_mask[1]) and weight is not None
    dx = _common.empty(x.shape, x.dtype, x.device) if want_dx else None
    if m == 0:
        return dx, (torch.zeros_like(weight) if want_dw else None)
    if not (want_dx or want_dw):
        return None, None
    x2, stride_x = as_rows(x, m, n)
    dy2, stride_dy = as_rows(grad_out, m, n)
    rstd1 = rstd.reshape(m).to(torch.float32).contiguous()
    w = weight.contiguous() if weight is not None else x2
    dx_buf = dx if dx is not None else rstd1  # placeholder pointer when dx is not wanted

    def run(cfg: Config):
        block = cfg["BLOCK_N"]
        dw_part = None
        if block >= n:
            g, rpp = partial_grid(m, x.device, want_dw)
            dw_part = partial_buf(g, n, x.device, want_dw)
            _common.launch(
                _rms_norm_bwd_kernel,
                (g,),
                dy2,
                x2,
                w,
                rstd1,
                dx_buf,
                dw_part if want_dw else rstd1,
                stride_dy,
                stride_x,
                m,
                n,
                rpp,
                HAS_WEIGHT=weight is not None,
                COMPUTE_DX=want_dx,
                COMPUTE_DW=want_dw,
                SINGLE_BLOCK=True,
                **cfg.as_kwargs(),
            )
        else:
            if want_dx:
                _common.launch(
                    _rms_norm_bwd_kernel,
                    (m,),
                    dy2,
                    x2,
                    w,
                    rstd1,
                    dx_buf,
                    rstd1,
                    stride_dy,
                    stride_x,
                    m,
                    n,
                    1,
                    HAS_WEIGHT=weight is not None,
                    COMPUTE_DX=True,
                    COMPUTE_DW=False,
                    SINGLE_BLOCK=False,
                    **cfg.as_kwargs(),
                )
            if want_dw:
                g, rpp = partial_grid(m, x.device, True)
                dw_part = partial_buf(g, n, x.device, True)
                _common.launch(
                    _rms_norm_bwd_dw_kernel,
                    (_common.cdiv(n, block), g),
                    dy2,
                    x2,
                    rstd1,
                    dw_part,
                    stride_dy,
                    stride_x,
                    m,
                    n,
                    rpp,
                    **cfg.as_kwargs(),
                )
        return dw_part

    key = (x.dtype, weight is not None, want_dx, want_dw)
    dw_part = run(pick_config("rms_norm_bwd", _BWD_CONFIGS, n, key, run, config))
    return dx, sum_partials(dw_part, weight)


# --- fallbacks (ATen / eager composite) ------------------------------------------------


def _composite_fwd(x, normalized_shape, weight, eps):
    """Eager equivalent of ``aten._fused_rms_norm`` (its decomposition)."""
    if eps is None:
        eps = default_eps(x.dtype)
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    xf = x.to(_rstd_dtype(x))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
    out = xf * rstd
    if weight is not None:
        out = out * weight
    return out.to(x.dtype).contiguous(), rstd.contiguous()


def _aten_fwd(x, normalized_shape, weight, eps):
    if hasattr(torch.ops.aten, "_fused_rms_norm"):
        out, rstd = torch.ops.aten._fused_rms_norm(x, normalized_shape, weight, eps)
        return out.contiguous(), rstd.to(_rstd_dtype(x)).contiguous()
    return _composite_fwd(x, normalized_shape, weight, eps)


def _composite_bwd(grad_out, x, normalized_shape, rstd, weight, mask):
    """Eager equivalent of ``aten._fused_rms_norm_backward`` (which has no CPU kernel)."""
    n = _prod(normalized_shape)
    cdt = _rstd_dtype(x)
    xf = x.to(cdt).reshape(-1, n)
    dyf = grad_out.to(cdt).reshape(-1, n)
    r = rstd.to(cdt).reshape(-1, 1)
    xhat = xf * r
    dx = dw = None
    if mask[0]:
        wdy = dyf * weight.to(cdt).reshape(1, n) if weight is not None else dyf
        dx = (r * (wdy - xhat * (wdy * xhat).mean(dim=1, keepdim=True))).to(x.dtype)
        dx = dx.view(x.shape)
    if mask[1] and weight is not None:
        dw = (dyf * xhat).sum(0).to(weight.dtype).view(weight.shape)
    return dx, dw


def _aten_bwd(grad_out, x, normalized_shape, rstd, weight, mask):
    if x.device.type == "cuda" and hasattr(torch.ops.aten, "_fused_rms_norm_backward"):
        return torch.ops.aten._fused_rms_norm_backward(
            grad_out, x, normalized_shape, rstd, weight, mask
        )
    return _composite_bwd(grad_out, x, normalized_shape, rstd, weight, mask)


# --- custom ops ----------------------------------------------------------------------


@torch.library.custom_op(
    "tile::rms_norm",
    mutates_args=(),
    schema="(Tensor input, SymInt[] normalized_shape, Tensor? weight, float? eps) -> (Tensor, Tensor)",
)
@plans.planned("tile::rms_norm")
def rms_norm_op(input, normalized_shape, weight, eps):
    """``aten._fused_rms_norm`` on the tile kernel (ATen / eager when it cannot run)."""
    ns = [int(v) for v in normalized_shape]
    return _common.guarded_op(
        "rms_norm_fwd",
        check_rms_norm(input, ns, weight),
        key=(input.dtype, weight is not None),
        run=lambda: rms_norm_fwd(input, ns, weight, eps),
        fallback=lambda: _aten_fwd(input, ns, weight, eps),
    )


@rms_norm_op.register_fake
def _(input, normalized_shape, weight, eps):
    out = input.new_empty(input.shape)
    rstd = input.new_empty(stats_shape(input, normalized_shape), dtype=_rstd_dtype(input))
    return out, rstd


@torch.library.custom_op(
    "tile::rms_norm_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor rstd, "
    "Tensor? weight, bool[] output_mask) -> (Tensor, Tensor)",
)
@plans.planned("tile::rms_norm_backward")
def rms_norm_backward_op(grad_out, input, normalized_shape, rstd, weight, output_mask):
    """``aten._fused_rms_norm_backward`` on the tile kernel.  An entry whose
    ``output_mask`` is False (or dw without weight) is an empty ``(0,)`` tensor."""
    ns = [int(v) for v in normalized_shape]
    mask = [bool(output_mask[0]), bool(output_mask[1]) and weight is not None]
    res = _common.guarded_op(
        "rms_norm_bwd",
        check_rms_norm(input, ns, weight) or grad_out_reason(grad_out, input),
        key=(input.dtype, weight is not None, *mask),
        run=lambda: rms_norm_bwd(grad_out, input, ns, rstd, weight, mask),
        fallback=lambda: _aten_bwd(grad_out, input, ns, rstd, weight, mask),
    )
    return fill_masked(res, input, weight)


@rms_norm_backward_op.register_fake
def _(grad_out, input, normalized_shape, rstd, weight, output_mask):
    dx = input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,))
    if output_mask[1] and weight is not None:
        dw = weight.new_empty(weight.shape)
    else:
        dw = (weight if weight is not None else input).new_empty((0,))
    return dx, dw


def _rms_setup_context(ctx, inputs, output):
    input, normalized_shape, weight, _eps = inputs
    _out, rstd = output
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(input, weight, rstd)


def _rms_backward(ctx, grad_out, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and weight is not None]
    dx, dw = torch.ops.tile.rms_norm_backward(
        grad_out, input, ctx.normalized_shape, rstd, weight, mask
    )
    return dx if mask[0] else None, None, dw if mask[1] else None, None


rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup_context)


# --- sm_90 compile specs (tests) ------------------------------------------------------


def sm90_specs() -> list[dict]:
    """Every (kernel, config, dtype[, variant]) this module can launch, for a compile test."""
    specs: list[dict] = []
    for dt in _common.SUPPORTED_DTYPES:
        t = "*" + _common.triton_dtype_name(dt)
        fwd_sig = signature(t, "X:T Y:T W:T Rstd:*fp32 stride_x:i32 N:i32 eps:fp32")
        rows = "DW_part:*fp32 stride_dy:i32 stride_x:i32 M:i32 N:i32 rows_per_program:i32"
        bwd_sig = signature(t, f"DY:T X:T W:T Rstd:*fp32 DX:T {rows}")
        dw_sig = signature(t, f"DY:T X:T Rstd:*fp32 {rows}")
        for cfg in _FWD_CONFIGS:
            for single in (True, False):
                specs.append(
                    compile_spec(
                        f"rms_norm_fwd[{t[1:]},{cfg},single={single}]",
                        _rms_norm_fwd_kernel,
                        cfg,
                        dict(fwd_sig),
                        {"HAS_WEIGHT": True, "BLOCK_N": cfg["BLOCK_N"], "SINGLE_BLOCK": single},
                    )
                )
        for cfg in _BWD_CONFIGS:
            for single in (True, False):
                specs.append(
                    compile_spec(
                        f"rms_norm_bwd[{t[1:]},{cfg},single={single}]",
                        _rms_norm_bwd_kernel,
                        cfg,
                        dict(bwd_sig),
                        {
                            "HAS_WEIGHT": True,
                            "COMPUTE_DX": True,
                            "COMPUTE_DW": single,
                            "BLOCK_N": cfg["BLOCK_N"],
                            "SINGLE_BLOCK": single,
                        },
                    )
                )
            specs.append(
                compile_spec(
                    f"rms_norm_bwd_dw[{t[1:]},{cfg}]",
                    _rms_norm_bwd_dw_kernel,
                    cfg,
                    dict(dw_sig),
                    {"BLOCK_N": cfg["BLOCK_N"]},
                )
            )
    return specs
