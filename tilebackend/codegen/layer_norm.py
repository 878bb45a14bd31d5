"""LayerNorm forward / backward as Triton tile kernels (after Triton tutorial 05 and
Liger Kernel's ``ops/layer_norm.py``), plus the ``tile::layer_norm`` /
``tile::layer_norm_backward`` custom ops that mirror ``aten.native_layer_norm`` and
``aten.native_layer_norm_backward`` one to one.

Layout: the input is seen as ``[M, N]`` rows, N = prod(normalized_shape) (the trailing
dims, flattened) and M = prod(the leading dims).  The kernels take a row stride and
assume the normalized part is contiguous (column stride 1); an input whose trailing dims
are not contiguous, or whose leading dims cannot be folded into one row stride, is made
contiguous by the launcher first.  Outputs are contiguous, as ATen's are.

Numerics: loads are upcast to fp32, all math is fp32, ``out`` is stored in the input
dtype.  The kernels write mean / rstd in fp32; the op layer then casts them to the dtype
ATen gives (see :func:`stats_dtype`).

Kernels:

* ``layer_norm_fwd``: one program per row.  ``SINGLE_BLOCK`` (N <= BLOCK_N) keeps the
  row in registers (two-pass mean / variance on registers); otherwise a per-lane Welford
  pass over the row in BLOCK_N chunks, then a normalize pass.
* ``layer_norm_bwd``: dx per row (c1 = mean(xhat * w*dy), c2 = mean(w*dy),
  dx = (w*dy - xhat*c1 - c2) * rstd).  With ``SINGLE_BLOCK`` each program owns a block
  of rows and also accumulates dW / dB partial sums in registers, written to a
  ``[programs, N]`` fp32 buffer and summed on the host.  When the row does not fit one
  block, dW / dB come from a second kernel (column blocks x row blocks, same partial
  buffer scheme).  No atomics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _common, autotune, plans
from .autotune import Config

__all__ = [
    "check_layer_norm",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "sm90_specs",
    "stats_dtype",
]

# --- kernels -----------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # *T    [M, N] input rows: row stride stride_x, column stride 1
    Y,  # *T    [M, N] output, contiguous
    W,  # *T    [N] weight (read only if HAS_WEIGHT)
    B,  # *T    [N] bias (read only if HAS_BIAS)
    Mean,  # *fp32 [M] per-row mean (written)
    Rstd,  # *fp32 [M] per-row 1 / sqrt(var + eps) (written)
    stride_x,  # int: elements between consecutive rows of X
    N,  # int: normalized size (columns per row)
    eps,  # fp32: added to the (biased) variance
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
        mean = tl.sum(x, axis=0) / N
        diff = tl.where(mask, x - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = diff * rstd
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * w
        if HAS_BIAS:
            b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            y = y + b
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Per-lane Welford over the row, then combine the lanes (Chan et al.).
        cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
        lane_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
        lane_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            new_cnt = cnt + tl.where(mask, 1.0, 0.0)
            delta = x - lane_mean
            lane_mean += tl.where(mask, delta / tl.maximum(new_cnt, 1.0), 0.0)
            lane_m2 += tl.where(mask, delta * (x - lane_mean), 0.0)
            cnt = new_cnt
        mean = tl.sum(lane_mean * cnt, axis=0) / N
        d = lane_mean - mean
        var = tl.sum(lane_m2 + cnt * d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                y = y * w
            if HAS_BIAS:
                b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
                y = y + b
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # *T    [M, N] grad of the output: row stride stride_dy, column stride 1
    X,  # *T    [M, N] forward input: row stride stride_x, column stride 1
    W,  # *T    [N] weight (read only if HAS_WEIGHT)
    Mean,  # *fp32 [M] per-row mean from the forward
    Rstd,  # *fp32 [M] per-row rstd from the forward
    DX,  # *T    [M, N] grad of the input, contiguous (written if COMPUTE_DX)
    DW_part,  # *fp32 [programs, N] per-program sum of dy * xhat (SINGLE_BLOCK and COMPUTE_DW)
    DB_part,  # *fp32 [programs, N] per-program sum of dy (SINGLE_BLOCK and COMPUTE_DB)
    stride_dy,  # int: elements between rows of DY
    stride_x,  # int: elements between rows of X
    M,  # int: rows
    N,  # int: normalized size
    rows_per_program,  # int: rows handled by one program (a contiguous block)
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # only honoured with SINGLE_BLOCK (else the dwdb kernel)
    COMPUTE_DB: tl.constexpr,  # only honoured with SINGLE_BLOCK (else the dwdb kernel)
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start64 = row_start.to(tl.int64)
        X += start64 * stride_x
        DY += start64 * stride_dy
        DX += start64 * N
        for row in range(row_start, row_end):
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if COMPUTE_DX:
                wdy = dy
                if HAS_WEIGHT:
                    wdy = dy * w
                c1 = tl.sum(xhat * wdy, axis=0) / N
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
                tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
            X += stride_x
            DY += stride_dy
            DX += N
        part = pid.to(tl.int64) * N
        if COMPUTE_DW:
            tl.store(DW_part + part + cols, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(DB_part + part + cols, db_acc, mask=mask)
    else:
        start64 = row_start.to(tl.int64)
        X += start64 * stride_x
        DY += start64 * stride_dy
        DX += start64 * N
        for row in range(row_start, row_end):
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            c1_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            c2_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                wdy = dy
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    wdy = dy * w
                c1_acc += xhat * wdy
                c2_acc += wdy
            c1 = tl.sum(c1_acc, axis=0) / N
            c2 = tl.sum(c2_acc, axis=0) / N
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                wdy = dy
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    wdy = dy * w
                dx = (wdy - (xhat * c1 + c2)) * rstd
                tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
            X += stride_x
            DY += stride_dy
            DX += N


@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    DY,  # *T    [M, N] grad of the output: row stride stride_dy, column stride 1
    X,  # *T    [M, N] forward input: row stride stride_x, column stride 1
    Mean,  # *fp32 [M] per-row mean
    Rstd,  # *fp32 [M] per-row rstd
    DW_part,  # *fp32 [row_programs, N] partial sum of dy * xhat (if COMPUTE_DW)
    DB_part,  # *fp32 [row_programs, N] partial sum of dy (if COMPUTE_DB)
    stride_dy,  # int: elements between rows of DY
    stride_x,  # int: elements between rows of X
    M,  # int: rows
    N,  # int: normalized size
    rows_per_program,  # int: rows summed by one program
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), row_programs)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    start64 = row_start.to(tl.int64)
    X += start64 * stride_x
    DY += start64 * stride_dy
    for row in range(row_start, row_end):
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            dw_acc += dy * ((x - mean) * rstd)
        if COMPUTE_DB:
            db_acc += dy
        X += stride_x
        DY += stride_dy
    part = pid_m.to(tl.int64) * N
    if COMPUTE_DW:
        tl.store(DW_part + part + cols, dw_acc, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_part + part + cols, db_acc, mask=mask)


# --- tuning space ------------------------------------------------------------------

#: (BLOCK_N, num_warps) pairs; num_stages=1: the loops stream rows, and pipelining would
#: only stage large blocks in shared memory.  Shared by rms_norm and fused_norm.
ROW_CONFIGS: tuple[Config, ...] = tuple(
    Config.make(num_warps=w, num_stages=1, BLOCK_N=b) for b, w in ((1024, 4), (4096, 8), (8192, 16))
)
_FWD_CONFIGS: tuple[Config, ...] = ROW_CONFIGS
_BWD_CONFIGS: tuple[Config, ...] = ROW_CONFIGS


def candidate_configs(space: Sequence[Config], n: int) -> tuple[list[Config], Config]:
    """The pruned configs worth timing for row size ``n``, and the heuristic pick.

    The heuristic is the smallest block that holds the whole row (the largest block when
    none does).  Candidates are that block and the smaller looped ones down to 1/8 of it.
    """
    space = sorted(space, key=lambda c: c["BLOCK_N"])
    fit = next((c for c in space if c["BLOCK_N"] >= n), space[-1])
    top = fit["BLOCK_N"]
    cands = [c for c in space if c["BLOCK_N"] <= top and c["BLOCK_N"] * 8 >= min(n, top)]
    return cands, fit


def pick_config(
    kernel: str, space: Sequence[Config], n: int, key: tuple, run, config: Config | None, **kw
) -> Config:
    """``config`` when given, else the autotuned pick among :func:`candidate_configs`.

    ``key`` is ``(dtype, *flags)``; the row-size bucket is inserted after the dtype.
    """
    if config is None:
        cands, heur = candidate_configs(space, n)
        full_key = (key[0], autotune.bucket(n), *key[1:])
        config = autotune.select(kernel, full_key, cands, heur, run, **kw)
    return config


# --- host helpers (shared with rms_norm) -------------------------------------------


def _prod(xs) -> int:
    return int(math.prod(int(v) for v in xs))


def shape_reason(x: torch.Tensor, normalized_shape: Sequence[int], *params) -> str | None:
    """Why ``normalized_shape`` / the affine params do not fit ``x`` (None when they do)."""
    ns = tuple(int(v) for v in normalized_shape)
    if len(ns) == 0:
        return "normalized_shape is empty"
    if x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns) :]) != ns:
        return f"input shape {tuple(x.shape)} does not end with normalized_shape {ns}"
    if _prod(ns) == 0:
        return "normalized size is 0"
    for name, p in params:
        if p is None:
            continue
        if r := _common.device_reason(p):
            return f"{name}: {r}"
        if p.device != x.device:
            return f"{name} is on {p.device}, input on {x.device}"
        if p.dtype != x.dtype:
            return f"{name} dtype {p.dtype} differs from input dtype {x.dtype} (not supported)"
        if tuple(p.shape) != ns:
            return f"{name} shape {tuple(p.shape)} != normalized_shape {ns}"
    return None


def as_rows(t: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, int]:
    """``t`` as ``[m, n]`` rows with column stride 1, and its row stride.

    A view when the leading dims fold into one row stride and the trailing (normalized)
    dims are contiguous; otherwise a contiguous copy.
    """
    try:
        v = t.view(m, n)
    except RuntimeError:
        v = None
    if v is None or (n > 1 and v.stride(1) != 1):
        v = t.contiguous().view(m, n)
    return v, (v.stride(0) if m > 1 else n)


def row_programs(m: int, device: torch.device) -> int:
    """How many programs share the rows when partial dW / dB sums are kept per program."""
    if device.type == "cuda":
        return max(1, min(m, 2 * _common.sm_count(device)))
    return max(1, min(m, 4))


def stats_shape(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    axis = x.dim() - len(normalized_shape)
    return tuple(x.shape[:axis]) + (1,) * len(normalized_shape)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of ``native_layer_norm``'s mean / rstd, as ATen (and its fake impl) gives it.

    CPU (and MTIA): the input dtype (bf16 in -> bf16 mean/rstd).  Elsewhere (CUDA):
    the accumulation type, fp32 for fp32 / fp16 / bf16 inputs.
    """
    if x.device.type in ("cpu", "mtia"):
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def grad_out_reason(grad_out: torch.Tensor, x: torch.Tensor) -> str | None:
    """Why ``grad_out`` does not match the forward input ``x`` (None when it does)."""
    if tuple(grad_out.shape) != tuple(x.shape):
        return f"grad_out shape {tuple(grad_out.shape)} != input shape {tuple(x.shape)}"
    if grad_out.dtype != x.dtype:
        return f"grad_out dtype {grad_out.dtype} != input dtype {x.dtype}"
    return None


def partial_grid(m: int, device: torch.device, partials: bool) -> tuple[int, int]:
    """``(programs, rows_per_program)`` for a launch over row blocks: one row per program,
    or :func:`row_programs` blocks when per-program partial sums are kept."""
    g = row_programs(m, device) if partials else m
    rpp = _common.cdiv(m, g)
    return _common.cdiv(m, rpp), rpp


def partial_buf(g: int, n: int, device: torch.device, want: bool) -> torch.Tensor | None:
    """The ``[g, n]`` fp32 partial-sum buffer (None when that grad is not wanted)."""
    return _common.empty((g, n), torch.float32, device) if want else None


def sum_partials(part: torch.Tensor | None, param: torch.Tensor | None) -> torch.Tensor | None:
    """The per-program partial sums reduced (in fp32) to a grad shaped like ``param``.
    (Through :func:`~._common.host_op` into allocated tensors, so that a launch plan
    can replay it.)"""
    if part is None:
        return None
    n = part.shape[1]
    total = _common.empty((n,), torch.float32, part.device)
    _common.host_op(torch.sum, part, 0, out=total)
    if param.dtype != torch.float32:
        grad = _common.empty((n,), param.dtype, part.device)
        _common.host_op(torch.Tensor.copy_, grad, total)
        total = grad
    return total.view(param.shape)


def fill_masked(res, x: torch.Tensor, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Custom ops cannot return None: a masked-off grad is an empty ``(0,)`` tensor
    (``res`` is ``(dx, *param_grads)``)."""
    like = (x, *(p if p is not None else x for p in params))
    return tuple(
        r if r is not None else _common.empty((0,), t.dtype, t.device)
        for r, t in zip(res, like, strict=True)
    )


def signature(t: str, spec: str) -> dict[str, str]:
    """A compile-spec signature from ``"name:type ..."`` words; type ``T`` is ``t``."""
    return {k: t if v == "T" else v for k, v in (w.split(":") for w in spec.split())}


def compile_spec(name: str, fn, cfg: Config, sig: dict[str, str], constexprs: dict) -> dict:
    """One sm_90 compile spec: ``fn`` at ``cfg``'s warps / stages."""
    return {
        "name": name,
        "fn": fn,
        "signature": sig,
        "constexprs": constexprs,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


# --- public launchers --------------------------------------------------------------


@_common.memo_reason
def check_layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> str | None:
    """Why the tile kernels cannot take this layer norm (None when they can)."""
    if r := _common.device_reason(x):
        return r
    if r := _common.dtype_reason(x):
        return r
    return shape_reason(x, normalized_shape, ("weight", weight), ("bias", bias))


def layer_norm_fwd(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)`` like ``aten.native_layer_norm``; mean / rstd are fp32 here
    (the op layer casts them to :func:`stats_dtype`).  ``config`` forces a config."""
    reason = check_layer_norm(x, normalized_shape, weight, bias)
    if reason:
        raise ValueError(f"layer_norm_fwd: {reason}")
    n = _prod(normalized_shape)
    m = x.numel() // n
    sshape = stats_shape(x, normalized_shape)
    out = _common.empty(x.shape, x.dtype, x.device)
    mean = _common.empty(sshape, torch.float32, x.device)
    rstd = _common.empty(sshape, torch.float32, x.device)
    if m == 0:
        return out, mean, rstd
    x2, stride_x = as_rows(x, m, n)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2

    def run(cfg: Config):
        block = cfg["BLOCK_N"]
        _common.launch(
            _layer_norm_fwd_kernel,
            (m,),
            x2,
            out,
            w,
            b,
            mean,
            rstd,
            stride_x,
            n,
            float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            SINGLE_BLOCK=block >= n,
            **cfg.as_kwargs(),
        )

    key = (x.dtype, weight is not None, bias is not None)
    run(pick_config("layer_norm_fwd", _FWD_CONFIGS, n, key, run, config))
    return out, mean, rstd


def layer_norm_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: Sequence[bool],
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dw, db)`` like ``aten.native_layer_norm_backward``; an entry is None when
    its mask is False, or (dw / db) when weight / bias is None."""
    reason = check_layer_norm(x, normalized_shape, weight, bias) or grad_out_reason(grad_out, x)
    if reason:
        raise ValueError(f"layer_norm_bwd: {reason}")
    n = _prod(normalized_shape)
    m = x.numel() // n
    want_dx = bool(output_mask[0])
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = bool(output_mask[2]) and bias is not None
    dx = _common.empty(x.shape, x.dtype, x.device) if want_dx else None
    if m == 0:
        dw = torch.zeros_like(weight) if want_dw else None
        db = torch.zeros_like(bias) if want_db else None
        return dx, dw, db
    if not (want_dx or want_dw or want_db):
        return None, None, None
    x2, stride_x = as_rows(x, m, n)
    dy2, stride_dy = as_rows(grad_out, m, n)
    mean1 = mean.reshape(m).to(torch.float32).contiguous()
    rstd1 = rstd.reshape(m).to(torch.float32).contiguous()
    w = weight.contiguous() if weight is not None else x2
    dx_buf = dx if dx is not None else mean1  # placeholder pointer when dx is not wanted

    def run(cfg: Config):
        block = cfg["BLOCK_N"]
        single = block >= n
        dw_part = db_part = None
        if single:
            # dx and the dW / dB partial sums in one pass; programs own row blocks.
            g, rpp = partial_grid(m, x.device, want_dw or want_db)
            dw_part = partial_buf(g, n, x.device, want_dw)
            db_part = partial_buf(g, n, x.device, want_db)
            _common.launch(
                _layer_norm_bwd_kernel,
                (g,),
                dy2,
                x2,
                w,
                mean1,
                rstd1,
                dx_buf,
                dw_part if want_dw else mean1,
                db_part if want_db else mean1,
                stride_dy,
                stride_x,
                m,
                n,
                rpp,
                HAS_WEIGHT=weight is not None,
                COMPUTE_DX=want_dx,
                COMPUTE_DW=want_dw,
                COMPUTE_DB=want_db,
                SINGLE_BLOCK=True,
                **cfg.as_kwargs(),
            )
        else:
            if want_dx:
                _common.launch(
                    _layer_norm_bwd_kernel,
                    (m,),
                    dy2,
                    x2,
                    w,
                    mean1,
                    rstd1,
                    dx_buf,
                    mean1,
                    mean1,
                    stride_dy,
                    stride_x,
                    m,
                    n,
                    1,
                    HAS_WEIGHT=weight is not None,
                    COMPUTE_DX=True,
                    COMPUTE_DW=False,
                    COMPUTE_DB=False,
                    SINGLE_BLOCK=False,
                    **cfg.as_kwargs(),
                )
            if want_dw or want_db:
                g, rpp = partial_grid(m, x.device, True)
                dw_part = partial_buf(g, n, x.device, want_dw)
                db_part = partial_buf(g, n, x.device, want_db)
                _common.launch(
                    _layer_norm_bwd_dwdb_kernel,
                    (_common.cdiv(n, block), g),
                    dy2,
                    x2,
                    mean1,
                    rstd1,
                    dw_part if want_dw else mean1,
                    db_part if want_db else mean1,
                    stride_dy,
                    stride_x,
                    m,
                    n,
                    rpp,
                    COMPUTE_DW=want_dw,
                    COMPUTE_DB=want_db,
                    **cfg.as_kwargs(),
                )
        return dw_part, db_part

    key = (x.dtype, weight is not None, want_dx, want_dw, want_db)
    dw_part, db_part = run(pick_config("layer_norm_bwd", _BWD_CONFIGS, n, key, run, config))
    return dx, sum_partials(dw_part, weight), sum_partials(db_part, bias)


# --- custom ops ----------------------------------------------------------------------


def _aten_fwd(x, normalized_shape, weight, bias, eps):
    out, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
    sd = stats_dtype(x)
    return out, mean.to(sd), rstd.to(sd)


def _aten_bwd(grad_out, x, normalized_shape, mean, rstd, weight, bias, mask):
    sd = stats_dtype(x)
    return torch.ops.aten.native_layer_norm_backward(
        grad_out, x, normalized_shape, mean.to(sd), rstd.to(sd), weight, bias, mask
    )


def _effective_mask(output_mask, weight, bias) -> list[bool]:
    return [
        bool(output_mask[0]),
        bool(output_mask[1]) and weight is not None,
        bool(output_mask[2]) and bias is not None,
    ]


@torch.library.custom_op(
    "tile::layer_norm",
    mutates_args=(),
    schema="(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
    "float eps) -> (Tensor, Tensor, Tensor)",
)
@plans.planned("tile::layer_norm")
def layer_norm_op(input, normalized_shape, weight, bias, eps):
    """``aten.native_layer_norm`` on the tile kernel (ATen when the kernel cannot run)."""
    ns = [int(v) for v in normalized_shape]

    def run():
        out, mean, rstd = layer_norm_fwd(input, ns, weight, bias, eps)
        sd = stats_dtype(input)
        return out, mean.to(sd), rstd.to(sd)

    return _common.guarded_op(
        "layer_norm_fwd",
        check_layer_norm(input, ns, weight, bias),
        key=(input.dtype, weight is not None, bias is not None),
        run=run,
        fallback=lambda: _aten_fwd(input, ns, weight, bias, eps),
    )


@layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps):
    return torch.ops.aten.native_layer_norm(input, normalized_shape, weight, bias, eps)


@torch.library.custom_op(
    "tile::layer_norm_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor mean, "
    "Tensor rstd, Tensor? weight, Tensor? bias, bool[] output_mask) -> (Tensor, Tensor, Tensor)",
)
@plans.planned("tile::layer_norm_backward")
def layer_norm_backward_op(
    grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask
):
    """``aten.native_layer_norm_backward`` on the tile kernel.  An entry whose
    ``output_mask`` is False (or dw / db without weight / bias) is an empty ``(0,)``
    tensor, since custom ops cannot return None."""
    ns = [int(v) for v in normalized_shape]
    mask = _effective_mask(output_mask, weight, bias)
    res = _common.guarded_op(
        "layer_norm_bwd",
        check_layer_norm(input, ns, weight, bias) or grad_out_reason(grad_out, input),
        key=(input.dtype, weight is not None, *mask),
        run=lambda: layer_norm_bwd(grad_out, input, ns, mean, rstd, weight, bias, mask),
        fallback=lambda: _aten_bwd(grad_out, input, ns, mean, rstd, weight, bias, mask),
    )
    return fill_masked(res, input, weight, bias)


@layer_norm_backward_op.register_fake
def _(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    mask = _effective_mask(output_mask, weight, bias)
    res = torch.ops.aten.native_layer_norm_backward(
        grad_out, input, normalized_shape, mean, rstd, weight, bias, mask
    )
    return fill_masked(res, input, weight, bias)


def _ln_setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, _eps = inputs
    _out, mean, rstd = output
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(input, weight, bias, mean, rstd)


def _ln_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    mask = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[2] and weight is not None,
        ctx.needs_input_grad[3] and bias is not None,
    ]
    dx, dw, db = torch.ops.tile.layer_norm_backward(
        grad_out, input, ctx.normalized_shape, mean, rstd, weight, bias, mask
    )
    return (
        dx if mask[0] else None,
        None,
        dw if mask[1] else None,
        db if mask[2] else None,
        None,
    )


layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)


# --- sm_90 compile specs (tests) ------------------------------------------------------


def sm90_specs() -> list[dict]:
    """Every (kernel, config, dtype[, variant]) this module can launch, for a compile test."""
    specs: list[dict] = []
    for dt in _common.SUPPORTED_DTYPES:
        t = "*" + _common.triton_dtype_name(dt)
        fwd_sig = signature(t, "X:T Y:T W:T B:T Mean:*fp32 Rstd:*fp32 stride_x:i32 N:i32 eps:fp32")
        tail = "DW_part:*fp32 DB_part:*fp32 stride_dy:i32 stride_x:i32 M:i32 N:i32"
        rows = f"{tail} rows_per_program:i32"
        bwd_sig = signature(t, f"DY:T X:T W:T Mean:*fp32 Rstd:*fp32 DX:T {rows}")
        dwdb_sig = signature(t, f"DY:T X:T Mean:*fp32 Rstd:*fp32 {rows}")
        for cfg in _FWD_CONFIGS:
            for single in (True, False):
                specs.append(
                    compile_spec(
                        f"layer_norm_fwd[{t[1:]},{cfg},single={single}]",
                        _layer_norm_fwd_kernel,
                        cfg,
                        dict(fwd_sig),
                        {
                            "HAS_WEIGHT": True,
                            "HAS_BIAS": True,
                            "BLOCK_N": cfg["BLOCK_N"],
                            "SINGLE_BLOCK": single,
                        },
                    )
                )
        for cfg in _BWD_CONFIGS:
            for single in (True, False):
                specs.append(
                    compile_spec(
                        f"layer_norm_bwd[{t[1:]},{cfg},single={single}]",
                        _layer_norm_bwd_kernel,
                        cfg,
                        dict(bwd_sig),
                        {
                            "HAS_WEIGHT": True,
                            "COMPUTE_DX": True,
                            "COMPUTE_DW": single,
                            "COMPUTE_DB": single,
                            "BLOCK_N": cfg["BLOCK_N"],
                            "SINGLE_BLOCK": single,
                        },
                    )
                )
            specs.append(
                compile_spec(
                    f"layer_norm_bwd_dwdb[{t[1:]},{cfg}]",
                    _layer_norm_bwd_dwdb_kernel,
                    cfg,
                    dict(dwdb_sig),
                    {"COMPUTE_DW": True, "COMPUTE_DB": True, "BLOCK_N": cfg["BLOCK_N"]},
                )
            )
    return specs
