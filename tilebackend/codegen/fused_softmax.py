"""Softmax with a fused prologue: ``softmax(x * scale + mask, dim)`` in one pass over a row,
and its backward, as Triton kernels plus the ``tile::scale_mask_softmax`` custom op.

The attention-scores pattern (``(q @ k^T) * scale``, an additive mask or a boolean
``masked_fill(mask, -inf)``, then softmax) reads ``x`` and the mask once and writes the
probabilities once, instead of materialising ``x * scale`` and ``x * scale + mask``.

Mask modes (from the mask's dtype):

* no mask;
* a float mask (fp32 / fp16 / bf16): *added* to ``x * scale`` (``-inf`` entries drop a
  column); the result dtype is ``promote_types(x.dtype, mask.dtype)``, as eager's;
* a bool mask: ``True`` means *masked out* (``x.masked_fill(mask, -inf)``); the result has
  ``x``'s dtype.

The mask broadcasts to ``x`` (``[B, 1, T, T]`` or ``[1, 1, T, T]`` for ``[B, H, T, T]``
scores) and is read through its broadcast strides (0 on broadcast dims): it is never
expanded in memory.  Rows are laid out as in :mod:`.softmax` (any dim, any strides, up to
three non-softmax dim groups).  All math is fp32; a row whose every entry is masked gives
NaN, as eager's.

Backward: ``dx = scale * y * (g - sum(g * y))``; a float mask that requires grad gets
``(y * (g - sum(g * y))).sum_to_size(mask.shape)``.  Dropout is not fused (see the report).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common, autotune
from .softmax import (
    MAX_ROWS,
    MAX_SINGLE_BLOCK,
    _all_single_blocks,
    _plan,
    _row_offset,
    _single_block,
    _wrap_dim,
    looped_configs,
    looped_heuristic,
    single_configs,
    single_heuristic,
)

Tensor = torch.Tensor

__all__ = [
    "check",
    "check_bwd",
    "out_dtype",
    "reference",
    "scale_mask_softmax_bwd",
    "scale_mask_softmax_fwd",
    "sm90_specs",
]

KERNEL_NAMES = ("scale_mask_softmax_fwd", "scale_mask_softmax_bwd")
_MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool)


# --- kernels -------------------------------------------------------------------------


@triton.jit
def _scores(x_row, m_row, offs, x_sn, m_sn, scale, N, MASK_MODE: tl.constexpr):
    """``x * scale (+ mask | masked_fill -inf)`` over columns ``offs`` of one row, fp32;
    ``-inf`` past the row end."""
    inb = offs < N
    offs64 = offs.to(tl.int64)
    z = tl.load(x_row + offs64 * x_sn, mask=inb, other=0.0).to(tl.float32) * scale
    if MASK_MODE == 1:
        z += tl.load(m_row + offs64 * m_sn, mask=inb, other=0.0).to(tl.float32)
    elif MASK_MODE == 2:
        mk = tl.load(m_row + offs64 * m_sn, mask=inb, other=0)
        z = tl.where(mk != 0, -float("inf"), z)
    return tl.where(inb, z, -float("inf"))


@triton.jit
def _scale_mask_softmax_fwd_kernel(
    y_ptr,  # *out [G0, G1, G2] x [N] (contiguous)
    x_ptr,  # *in  [G0, G1, G2] x [N] (any strides)
    m_ptr,  # *mask, broadcast to x (stride 0 on broadcast dims; uint8 for a bool mask)
    N,  # int: softmax-dim length
    G1,  # int: size of the 2nd non-softmax dim group
    G2,  # int: size of the 3rd (innermost) non-softmax dim group
    x_s0,
    x_s1,
    x_s2,
    x_sn,
    y_s0,
    y_s1,
    y_s2,
    y_sn,
    m_s0,
    m_s1,
    m_s2,
    m_sn,
    scale,  # fp32
    MASK_MODE: tl.constexpr,  # 0: none, 1: additive, 2: bool (True = -inf)
    SINGLE: tl.constexpr,  # N <= BLOCK_N: the row in registers
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, G1, G2, x_s0, x_s1, x_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    m_row = m_ptr + _row_offset(row, G1, G2, m_s0, m_s1, m_s2)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        z = _scores(x_row, m_row, cols, x_sn, m_sn, scale, N, MASK_MODE)
        e = tl.exp(z - tl.max(z, axis=0))  # all -inf: NaN, like eager
        y = e / tl.sum(e, axis=0)
        tl.store(y_row + cols.to(tl.int64) * y_sn, y.to(y_ptr.dtype.element_ty), mask=cols < N)
    else:
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            z = _scores(x_row, m_row, start + cols, x_sn, m_sn, scale, N, MASK_MODE)
            m_new = tl.maximum(m, z)
            d = tl.where(m_new > -float("inf"), d * tl.exp(m - m_new) + tl.exp(z - m_new), 0.0)
            m = m_new
        row_max = tl.max(m, axis=0)
        row_sum = tl.sum(tl.where(m > -float("inf"), d * tl.exp(m - row_max), 0.0), axis=0)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            z = _scores(x_row, m_row, offs, x_sn, m_sn, scale, N, MASK_MODE)
            y = tl.exp(z - row_max) / row_sum
            tl.store(y_row + offs.to(tl.int64) * y_sn, y.to(y_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _scale_mask_softmax_bwd_kernel(
    dx_ptr,  # *out [G0, G1, G2] x [N] (contiguous)
    dy_ptr,  # *in  grad of the output (any strides)
    y_ptr,  # *in   forward output (any strides)
    N,
    G1,
    G2,
    dx_s0,
    dx_s1,
    dx_s2,
    dx_sn,
    dy_s0,
    dy_s1,
    dy_s2,
    dy_sn,
    y_s0,
    y_s1,
    y_s2,
    y_sn,
    scale,  # fp32: dx = scale * y * (g - sum(g * y))
    ZERO_NAN: tl.constexpr,  # a bool mask's fully masked row (y NaN) gets 0, as eager's
    SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dx_row = dx_ptr + _row_offset(row, G1, G2, dx_s0, dx_s1, dx_s2)
    dy_row = dy_ptr + _row_offset(row, G1, G2, dy_s0, dy_s1, dy_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        inb = cols < N
        c64 = cols.to(tl.int64)
        g = tl.load(dy_row + c64 * dy_sn, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(y_row + c64 * y_sn, mask=inb, other=0.0).to(tl.float32)
        dx = scale * y * (g - tl.sum(g * y, axis=0))
        if ZERO_NAN:
            dx = tl.where(y == y, dx, 0.0)
        tl.store(dx_row + c64 * dx_sn, dx.to(dx_ptr.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            inb = offs < N
            o64 = offs.to(tl.int64)
            g = tl.load(dy_row + o64 * dy_sn, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(y_row + o64 * y_sn, mask=inb, other=0.0).to(tl.float32)
            acc += g * y
        s = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            inb = offs < N
            o64 = offs.to(tl.int64)
            g = tl.load(dy_row + o64 * dy_sn, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(y_row + o64 * y_sn, mask=inb, other=0.0).to(tl.float32)
            dx = scale * y * (g - s)
            if ZERO_NAN:
                dx = tl.where(y == y, dx, 0.0)
            tl.store(dx_row + o64 * dx_sn, dx.to(dx_ptr.dtype.element_ty), mask=inb)


# --- host ----------------------------------------------------------------------------


def out_dtype(x: Tensor, mask: Tensor | None) -> torch.dtype:
    """The result dtype eager gives ``softmax(x * scale + mask)`` (bool mask: ``x``'s)."""
    if mask is None or mask.dtype == torch.bool:
        return x.dtype
    return torch.promote_types(x.dtype, mask.dtype)


def check(x, mask, dim) -> str | None:
    """Why the fused kernels cannot take ``x`` / ``mask`` over ``dim``, or None."""
    r = _common.device_reason(x) or _common.dtype_reason(x)
    if r:
        return f"x: {r}"
    if isinstance(dim, bool) or not isinstance(dim, int):
        return f"dim {dim!r} is not an int"
    if x.dim() == 0:
        return "x is 0-d"
    if not -x.dim() <= dim < x.dim():
        return f"dim {dim} is out of range for a {x.dim()}-dim tensor"
    if mask is not None:
        r = _common.device_reason(mask) or _common.dtype_reason(mask, _MASK_DTYPES)
        if r:
            return f"mask: {r}"
        if mask.device != x.device:
            return f"mask on {mask.device}, x on {x.device}"
        try:
            shape = tuple(torch.broadcast_shapes(mask.shape, x.shape))
        except RuntimeError:
            shape = None
        if shape != tuple(x.shape):
            return f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}"
    if all(isinstance(s, int) for s in x.shape):
        n = x.shape[dim]
        rows = math.prod(x.shape) // n if n else 0
        if rows > MAX_ROWS:
            return f"{rows} rows exceed the launch grid limit {MAX_ROWS}"
    return None


def check_bwd(grad, out, dim, input_dtype) -> str | None:
    """Why the backward kernel cannot take (``grad``, ``out``), or None."""
    r = check(grad, None, dim) or _common.device_reason(out) or _common.dtype_reason(out)
    if r:
        return r
    if grad.shape != out.shape or grad.device != out.device:
        return "grad and out differ in shape or device"
    if input_dtype not in _common.SUPPORTED_DTYPES:
        return f"input dtype {input_dtype} is not supported"
    return None


def reference(x: Tensor, scale: float, mask: Tensor | None, dim: int) -> Tensor:
    """Eager: ``softmax(x * scale + mask)`` / ``softmax(x.masked_fill(mask, -inf) ...)``."""
    z = x * scale
    if mask is not None:
        z = z.masked_fill(mask, -math.inf) if mask.dtype == torch.bool else z + mask
    return torch.softmax(z, dim).contiguous()


def _launch(kernel_name, kernel, n, rows, in_dtype, o_dtype, contiguous, block_n, launch):
    if block_n is not None:  # tests: force a block (looped when the row is longer)
        single = n <= block_n
        cfg = single_heuristic(block_n) if single else looped_heuristic(block_n)
        launch(cfg, single)
        return
    if n <= MAX_SINGLE_BLOCK:
        block = _single_block(n)
        configs, heur, single = single_configs(block), single_heuristic(block), True
    else:
        configs, heur, single = looped_configs(), looped_heuristic(), False
    key = (in_dtype, o_dtype, single, autotune.bucket(n), contiguous)
    cfg = autotune.select(kernel_name, key, configs, heur, lambda c: launch(c, single), fn=kernel)
    launch(cfg, single)


def scale_mask_softmax_fwd(
    x: Tensor, scale: float, mask: Tensor | None, dim: int = -1, *, block_n: int | None = None
) -> Tensor:
    """``softmax(x * scale + mask, dim)`` (bool mask: ``-inf`` where True) in one pass.
    Output contiguous, dtype :func:`out_dtype`.  ``block_n`` (tests) forces a block."""
    reason = check(x, mask, dim)
    if reason:
        raise ValueError(f"scale_mask_softmax_fwd: {reason}")
    dim = _wrap_dim(dim, x.dim())
    shape = tuple(x.shape)
    y = _common.empty(shape, out_dtype(x, mask), x.device)
    if math.prod(shape) == 0:
        return y
    n = shape[dim]
    rows = x.numel() // n
    mode = 0 if mask is None else 2 if mask.dtype == torch.bool else 1
    if mask is None:
        (y, x), g1, g2, (ys, xs) = _plan([y, x], dim)
        m, ms = x, xs
    else:
        m = mask.expand(shape)
        if mode == 2:
            m = m.view(torch.uint8)
        (y, x, m), g1, g2, (ys, xs, ms) = _plan([y, x, m], dim)

    def launch(cfg: autotune.Config, single: bool):
        _scale_mask_softmax_fwd_kernel[(rows,)](
            y, x, m, n, g1, g2, *xs, *ys, *ms, float(scale),
            MASK_MODE=mode, SINGLE=single, **cfg.as_kwargs(),
        )  # fmt: skip

    _launch(
        "scale_mask_softmax_fwd",
        _scale_mask_softmax_fwd_kernel,
        n,
        rows,
        x.dtype,
        (y.dtype, mode),
        xs[3] == 1,
        block_n,
        launch,
    )
    return y


def scale_mask_softmax_bwd(
    grad: Tensor,
    out: Tensor,
    scale: float,
    dim: int,
    input_dtype: torch.dtype,
    zero_nan: bool = False,
    *,
    block_n: int | None = None,
) -> Tensor:
    """``scale * out * (grad - sum(grad * out, dim))`` in ``input_dtype`` (contiguous);
    ``zero_nan``: 0 where ``out`` is NaN (a bool mask's fully masked rows, as eager)."""
    reason = check_bwd(grad, out, dim, input_dtype)
    if reason:
        raise ValueError(f"scale_mask_softmax_bwd: {reason}")
    dim = _wrap_dim(dim, grad.dim())
    shape = tuple(grad.shape)
    dx = _common.empty(shape, input_dtype, grad.device)
    if math.prod(shape) == 0:
        return dx
    n = shape[dim]
    rows = grad.numel() // n
    (dx, grad, out), g1, g2, (dxs, dys, ys) = _plan([dx, grad, out], dim)

    def launch(cfg: autotune.Config, single: bool):
        _scale_mask_softmax_bwd_kernel[(rows,)](
            dx, grad, out, n, g1, g2, *dxs, *dys, *ys, float(scale),
            ZERO_NAN=zero_nan, SINGLE=single, **cfg.as_kwargs(),
        )  # fmt: skip

    _launch(
        "scale_mask_softmax_bwd",
        _scale_mask_softmax_bwd_kernel,
        n,
        rows,
        grad.dtype,
        (out.dtype, input_dtype, zero_nan),
        dys[3] == 1 and ys[3] == 1,
        block_n,
        launch,
    )
    return dx


# --- custom ops ------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::scale_mask_softmax",
    mutates_args=(),
    schema="(Tensor x, float scale, Tensor? mask, int dim=-1) -> Tensor",
)
def scale_mask_softmax_op(x, scale, mask, dim=-1):
    """``softmax(x * scale + mask, dim)``; a bool mask means ``masked_fill(mask, -inf)``."""
    if check(x, mask, dim) is not None:
        return reference(x, scale, mask, dim)
    mode = "none" if mask is None else "bool" if mask.dtype == torch.bool else "add"
    return _common.guarded(
        "scale_mask_softmax_fwd",
        key=(x.dtype, None if mask is None else mask.dtype, mode),
        run=lambda: scale_mask_softmax_fwd(x, scale, mask, dim),
        fallback=lambda: reference(x, scale, mask, dim),
    )


@scale_mask_softmax_op.register_fake
def _(x, scale, mask, dim=-1):
    return x.new_empty(x.shape, dtype=out_dtype(x, mask))


def _reference_bwd(grad, out, scale, dim, input_dtype, zero_nan=False):
    g, y = grad.to(torch.float32), out.to(torch.float32)
    dx = scale * y * (g - (g * y).sum(dim, keepdim=True))
    if zero_nan:
        dx = dx.masked_fill(y.isnan(), 0.0)
    return dx.to(input_dtype)


@torch.library.custom_op(
    "tile::scale_mask_softmax_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor out, float scale, int dim, ScalarType input_dtype, "
    "bool zero_nan=False) -> Tensor",
)
def scale_mask_softmax_backward_op(grad, out, scale, dim, input_dtype, zero_nan=False):
    """``scale * out * (grad - sum(grad * out, dim))`` in ``input_dtype``; ``zero_nan``: 0
    where ``out`` is NaN (the fully masked rows of a bool mask: eager's masked_fill gives
    them a zero gradient)."""
    args = (grad, out, scale, dim, input_dtype, zero_nan)
    if check_bwd(grad, out, dim, input_dtype) is not None:
        return _reference_bwd(*args)
    return _common.guarded(
        "scale_mask_softmax_bwd",
        key=(grad.dtype, out.dtype, input_dtype, zero_nan),
        run=lambda: scale_mask_softmax_bwd(*args),
        fallback=lambda: _reference_bwd(*args),
    )


@scale_mask_softmax_backward_op.register_fake
def _(grad, out, scale, dim, input_dtype, zero_nan=False):
    return grad.new_empty(grad.shape, dtype=input_dtype)


def _setup(ctx, inputs, output):
    x, scale, mask, dim = inputs
    ctx.scale, ctx.dim, ctx.x_dtype = float(scale), dim, x.dtype
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_mask = ctx.needs_input_grad[2] and ctx.mask_dtype is not None
    gx = gmask = None
    op = torch.ops.tile.scale_mask_softmax_backward
    if need_mask:  # d(softmax input) once, in the output dtype; both grads from it
        dz = op(grad, out, 1.0, ctx.dim, out.dtype)
        gmask = dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
        if need_x:
            gx = (dz * ctx.scale).to(ctx.x_dtype)
    elif need_x:
        gx = op(grad, out, ctx.scale, ctx.dim, ctx.x_dtype, ctx.mask_dtype == torch.bool)
    return gx, None, gmask, None


torch.library.register_autograd("tile::scale_mask_softmax", _backward, setup_context=_setup)


# --- compile-for-Hopper specs ------------------------------------------------------------

_INT_FWD = ("N", "G1", "G2") + tuple(f"{p}_s{i}" for p in ("x", "y", "m") for i in "012n")
_INT_BWD = ("N", "G1", "G2") + tuple(f"{p}_s{i}" for p in ("dx", "dy", "y") for i in "012n")
_MASK_PTR = {0: None, 1: None, 2: "*u8"}


def _spec(fwd: bool, dt: torch.dtype, mode: int, single: bool, cfg: autotune.Config) -> dict:
    t = "*" + _common.triton_dtype_name(dt)
    if fwd:
        fn = _scale_mask_softmax_fwd_kernel
        sig = {"y_ptr": t, "x_ptr": t, "m_ptr": _MASK_PTR[mode] or t}
        ints, unit = _INT_FWD, ("x_sn", "y_sn", "m_sn")
        consts = {"MASK_MODE": mode}
    else:
        fn = _scale_mask_softmax_bwd_kernel
        sig = {"dx_ptr": t, "dy_ptr": t, "y_ptr": t}
        ints, unit = _INT_BWD, ("dx_sn", "dy_sn", "y_sn")
        consts = {"ZERO_NAN": mode == 2}
    sig.update({a: "i32" for a in ints if a not in unit})
    sig["scale"] = "fp32"
    consts.update({u: 1 for u in unit})
    consts.update({"SINGLE": single, **dict(cfg.kwargs)})
    kind = "fwd" if fwd else "bwd"
    return {
        "name": f"scale_mask_softmax_{kind}[{t[1:]},mode={mode},single={single},{cfg}]",
        "fn": fn,
        "signature": sig,
        "constexprs": consts,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def sm90_specs() -> list[dict]:
    """Every (direction, dtype, config) of the tuning spaces (single-block at every block
    size, looped), with an additive mask; the other mask modes on the heaviest configs."""
    single = [c for b in _all_single_blocks() for c in single_configs(b)]
    looped = looped_configs()
    specs = []
    for fwd in (True, False):
        for dt in _common.SUPPORTED_DTYPES:
            specs += [_spec(fwd, dt, 1, True, c) for c in single]
            specs += [_spec(fwd, dt, 1, False, c) for c in looped]
    # mode only matters to the backward as ZERO_NAN (a bool mask)
    heavy_s = max(single, key=lambda c: (c["BLOCK_N"], c.num_warps))
    heavy_l = max(looped, key=lambda c: (c["BLOCK_N"], c.num_warps))
    for dt in _common.SUPPORTED_DTYPES:
        for mode in (0, 2):
            specs += [_spec(True, dt, mode, True, heavy_s), _spec(True, dt, mode, False, heavy_l)]
        specs += [_spec(False, dt, 2, True, heavy_s), _spec(False, dt, 2, False, heavy_l)]
    return specs
