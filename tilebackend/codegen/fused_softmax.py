"""Softmax with a fused prologue: ``softmax(where(mask, fill, x * scale + add), dim)`` in
one pass over a row, and its backward, as Triton kernels plus the
``tile::scale_mask_softmax`` custom op.

The attention-scores pattern (``(q @ k^T) * scale``, an additive mask or a boolean
``masked_fill(mask, -inf)``, then softmax) reads ``x`` and the mask once and writes the
probabilities once, instead of materialising ``x * scale`` and ``x * scale + mask``.

The op's operands (``mask`` polymorphic, as the common cases have one mask):

* no mask;
* a float ``mask`` (fp32 / fp16 / bf16): *added* to ``x * scale`` (``-inf`` entries drop
  a column);
* a bool ``mask``: ``True`` means *filled* (``masked_fill(mask, fill)``), ``fill``
  ``-inf`` by default; a finite fill is MPT's ``finfo.min``, where an all-masked row is
  uniform instead of NaN;
* a float ``bias``: added first, then the mask is filled (MPT's ALiBi bias) or added
  (T5's position bias, then its attention mask).

The result dtype is eager's: ``x``'s promoted with the added tensors'.  Masks and biases
broadcast to ``x`` (``[B, 1, T, T]`` or ``[1, 1, T, T]`` for ``[B, H, T, T]`` scores) and
are read through their broadcast strides (0 on broadcast dims): they are never expanded in
memory.  Rows are laid out as in :mod:`.softmax` (any dim, any strides, up to three
non-softmax dim groups).  All math is fp32; a row whose every entry is ``-inf`` gives NaN,
as eager's, or 0 with ``safe`` (``aten._safe_softmax``, the softmax of attention's math
path; :func:`safe_softmax_op` is that op on its own).

Backward: ``dx = scale * y * (g - sum(g * y))``, zero where a finite fill filled (read from
the mask: those entries keep a probability but had no gradient); an added tensor that
requires grad gets the same ``dz`` without the scale, summed to its shape.

The forward kernel also draws a dropout after the softmax (``DROPOUT``); its op,
``tile::scale_mask_softmax_dropout``, is in :mod:`.fused_softmax_dropout`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common, autotune, plans
from .softmax import (
    MAX_ROWS,
    MAX_SINGLE_BLOCK,
    _all_single_blocks,
    _plan,
    _row_offset,
    _single_block,
    _softmax_grad,
    _wrap_dim,
    looped_configs,
    looped_heuristic,
    single_configs,
    single_heuristic,
)
from .softmax import _setup_context as _softmax_setup_context

Tensor = torch.Tensor

__all__ = [
    "check",
    "check_bwd",
    "check_safe",
    "out_dtype",
    "reference",
    "safe_softmax_op",
    "scale_mask_softmax_bwd",
    "scale_mask_softmax_fwd",
    "sm90_specs",
]

KERNEL_NAMES = (
    "scale_mask_softmax_fwd",
    "scale_mask_softmax_bwd",
    "scale_mask_softmax_dropout_fwd",
)
_MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool)


# --- kernels -------------------------------------------------------------------------


@triton.jit
def _scores(
    x_row, a_row, m_row, offs, x_sn, a_sn, m_sn, scale, fill, N,
    HAS_ADD: tl.constexpr, M_MODE: tl.constexpr,
):  # fmt: skip
    """``where(mask, fill, x * scale + add)`` (``M_MODE`` 1) or ``x * scale + add + m``
    (``M_MODE`` 2) over columns ``offs`` of one row, fp32; ``-inf`` past the row end."""
    inb = offs < N
    offs64 = offs.to(tl.int64)
    z = tl.load(x_row + offs64 * x_sn, mask=inb, other=0.0).to(tl.float32) * scale
    if HAS_ADD:
        z += tl.load(a_row + offs64 * a_sn, mask=inb, other=0.0).to(tl.float32)
    if M_MODE == 1:
        mk = tl.load(m_row + offs64 * m_sn, mask=inb, other=0)
        z = tl.where(mk != 0, fill, z)
    elif M_MODE == 2:
        z += tl.load(m_row + offs64 * m_sn, mask=inb, other=0.0).to(tl.float32)
    return tl.where(inb, z, -float("inf"))


@triton.jit
def _store_probs(
    y_ptr, probs_ptr, keep_ptr, offs, inb, y, seed, p, drop_scale,
    DROPOUT: tl.constexpr, WRITE_PROBS: tl.constexpr, WRITE_KEEP: tl.constexpr,
):  # fmt: skip
    """Store softmax values ``y`` (fp32) at element offsets ``offs`` of the output; with
    ``DROPOUT``, the output is the dropped-out ``y`` and the pre-dropout probabilities and
    the keep mask go to ``probs_ptr`` / ``keep_ptr`` when asked.  The random stream is
    Philox keyed by ``seed`` and each element's offset in the output.  As eager, the
    dropout scales the probabilities rounded to the output's dtype (the probabilities'
    own, or the one they are cast to before the dropout), and rounds again."""
    if DROPOUT:
        if WRITE_PROBS:
            tl.store(probs_ptr + offs, y.to(probs_ptr.dtype.element_ty), mask=inb)
        keep = tl.rand(seed, offs) > p
        if WRITE_KEEP:
            tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=inb)
        y = y.to(probs_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty).to(tl.float32)
        y = y * tl.where(keep, drop_scale, 0.0)  # (a NaN stays NaN where dropped, as eager)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _scale_mask_softmax_fwd_kernel(
    y_ptr,  # *out [G0, G1, G2] x [N] (contiguous)
    x_ptr,  # *in  [G0, G1, G2] x [N] (any strides)
    a_ptr,  # *in  added to x * scale, broadcast to x (stride 0 on broadcast dims)
    m_ptr,  # broadcast to x: *u8 bool mask, 1 = replaced by ``fill`` (M_MODE 1); or *in
    # added after a_ptr's tensor (M_MODE 2: T5's position bias, then its mask)
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
    a_s0,
    a_s1,
    a_s2,
    a_sn,
    m_s0,
    m_s1,
    m_s2,
    m_sn,
    scale,  # fp32
    fill,  # fp32: the value of masked entries (-inf drops them)
    seed_ptr,  # *i64 []: the dropout seed (unread unless DROPOUT)
    probs_ptr,  # *out, laid out as y: the softmax before dropout (written if WRITE_PROBS)
    keep_ptr,  # *u8, laid out as y: 1 where kept (written if WRITE_KEEP)
    p,  # fp32: drop probability
    drop_scale,  # fp32: kept values are multiplied by this (1 / (1 - p))
    HAS_ADD: tl.constexpr,  # a_ptr is read
    M_MODE: tl.constexpr,  # m_ptr: 0 unread, 1 a bool mask filled, 2 added
    DROPOUT: tl.constexpr,  # y = where(rand(seed, index in y) > p, softmax * drop_scale, 0)
    WRITE_PROBS: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    SAFE: tl.constexpr,  # a row whose scores are all -inf gives 0, not NaN (_safe_softmax)
    SINGLE: tl.constexpr,  # N <= BLOCK_N: the row in registers
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, G1, G2, x_s0, x_s1, x_s2)
    y_off = _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    a_row = a_ptr + _row_offset(row, G1, G2, a_s0, a_s1, a_s2)
    m_row = m_ptr + _row_offset(row, G1, G2, m_s0, m_s1, m_s2)
    cols = tl.arange(0, BLOCK_N)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    if SINGLE:
        z = _scores(x_row, a_row, m_row, cols, x_sn, a_sn, m_sn, scale, fill, N, HAS_ADD, M_MODE)
        row_max = tl.max(z, axis=0)
        if SAFE:  # all -inf: every exp is 0, and so is the sum
            row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
        e = tl.exp(z - row_max)  # all -inf: NaN, like eager (unless SAFE)
        row_sum = tl.sum(e, axis=0)
        if SAFE:  # 0 / 1 on an all -inf row (a NaN in a row makes its sum NaN: it stays)
            row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
        y = e / row_sum
        _store_probs(
            y_ptr, probs_ptr, keep_ptr, y_off + cols.to(tl.int64) * y_sn, cols < N, y,
            seed, p, drop_scale, DROPOUT, WRITE_PROBS, WRITE_KEEP,
        )  # fmt: skip
    else:
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            z = _scores(
                x_row, a_row, m_row, start + cols, x_sn, a_sn, m_sn, scale, fill, N,
                HAS_ADD, M_MODE,
            )  # fmt: skip
            m_new = tl.maximum(m, z, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays
            d = tl.where(m_new == -float("inf"), 0.0, d * tl.exp(m - m_new) + tl.exp(z - m_new))
            m = m_new
        row_max = tl.max(m, axis=0)
        if SAFE:  # all -inf: the sum is 0, and every exp below 0 (0 / 1)
            row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
        row_sum = tl.sum(tl.where(m == -float("inf"), 0.0, d * tl.exp(m - row_max)), axis=0)
        if SAFE:
            row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            z = _scores(
                x_row, a_row, m_row, offs, x_sn, a_sn, m_sn, scale, fill, N, HAS_ADD, M_MODE
            )  # fmt: skip
            y = tl.exp(z - row_max) / row_sum
            _store_probs(
                y_ptr, probs_ptr, keep_ptr, y_off + offs.to(tl.int64) * y_sn, offs < N, y,
                seed, p, drop_scale, DROPOUT, WRITE_PROBS, WRITE_KEEP,
            )  # fmt: skip


@triton.jit
def _grad(dy_row, k_row, offs, inb, dy_sn, k_sn, drop_scale, DROPOUT: tl.constexpr):
    """The output gradient over columns ``offs`` (int64) of a row, fp32; through the
    dropout's keep mask and scale with ``DROPOUT``, rounded to the gradient's dtype as
    eager's dropout backward rounds it (before a cast back to the probabilities')."""
    g = tl.load(dy_row + offs * dy_sn, mask=inb, other=0.0)
    if DROPOUT:
        kept = tl.load(k_row + offs * k_sn, mask=inb, other=0) != 0
        g = (g.to(tl.float32) * tl.where(kept, drop_scale, 0.0)).to(dy_row.dtype.element_ty)
    return g.to(tl.float32)


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
    k_ptr,  # *u8 keep mask of a dropout after the softmax (unread unless DROPOUT)
    k_s0,
    k_s1,
    k_s2,
    k_sn,
    drop_scale,  # fp32: with DROPOUT, g = grad * keep * drop_scale
    m_ptr,  # *u8 the forward's bool mask, broadcast (unread unless MASKED): 1 -> dx = 0
    m_s0,
    m_s1,
    m_s2,
    m_sn,
    ZERO_NAN: tl.constexpr,  # a bool mask's fully masked row (y NaN) gets 0, as eager's
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,  # a finite fill: masked entries pass no gradient
    SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dx_row = dx_ptr + _row_offset(row, G1, G2, dx_s0, dx_s1, dx_s2)
    dy_row = dy_ptr + _row_offset(row, G1, G2, dy_s0, dy_s1, dy_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    k_row = k_ptr + _row_offset(row, G1, G2, k_s0, k_s1, k_s2)
    m_row = m_ptr + _row_offset(row, G1, G2, m_s0, m_s1, m_s2)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        inb = cols < N
        c64 = cols.to(tl.int64)
        g = _grad(dy_row, k_row, c64, inb, dy_sn, k_sn, drop_scale, DROPOUT)
        y = tl.load(y_row + c64 * y_sn, mask=inb, other=0.0).to(tl.float32)
        dx = scale * y * (g - tl.sum(g * y, axis=0))
        if ZERO_NAN:
            dx = tl.where(y == y, dx, 0.0)
        if MASKED:
            dx = tl.where(tl.load(m_row + c64 * m_sn, mask=inb, other=0) != 0, 0.0, dx)
        tl.store(dx_row + c64 * dx_sn, dx.to(dx_ptr.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            inb = offs < N
            o64 = offs.to(tl.int64)
            g = _grad(dy_row, k_row, o64, inb, dy_sn, k_sn, drop_scale, DROPOUT)
            y = tl.load(y_row + o64 * y_sn, mask=inb, other=0.0).to(tl.float32)
            acc += g * y
        s = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            inb = offs < N
            o64 = offs.to(tl.int64)
            g = _grad(dy_row, k_row, o64, inb, dy_sn, k_sn, drop_scale, DROPOUT)
            y = tl.load(y_row + o64 * y_sn, mask=inb, other=0.0).to(tl.float32)
            dx = scale * y * (g - s)
            if ZERO_NAN:
                dx = tl.where(y == y, dx, 0.0)
            if MASKED:
                dx = tl.where(tl.load(m_row + o64 * m_sn, mask=inb, other=0) != 0, 0.0, dx)
            tl.store(dx_row + o64 * dx_sn, dx.to(dx_ptr.dtype.element_ty), mask=inb)


# --- host ----------------------------------------------------------------------------


def out_dtype(x: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> torch.dtype:
    """The result dtype eager gives ``softmax(x * scale + mask)`` (bool mask: ``x``'s),
    promoted with an added ``bias``'s."""
    dt = x.dtype
    for t in (mask, bias):
        if t is not None and t.dtype != torch.bool:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _operands(mask: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The kernel's ``(a, m)`` for the op's ``mask`` (float: added; bool: filled) and
    ``bias`` (added first): ``a`` is added, ``m`` filled from or added after ``a``."""
    if mask is not None and mask.dtype != torch.bool and bias is None:
        return mask, None
    return bias, mask


def _m_mode(m: Tensor | None) -> int:
    """The kernel's ``M_MODE`` for its ``m`` operand: 0 none, 1 bool (filled), 2 added."""
    return 0 if m is None else 1 if m.dtype == torch.bool else 2


def _broadcast_reason(what: str, t: Tensor, x: Tensor, dtypes) -> str | None:
    r = _common.device_reason(t) or _common.dtype_reason(t, dtypes)
    if r:
        return f"{what}: {r}"
    if t.device != x.device:
        return f"{what} on {t.device}, x on {x.device}"
    try:
        shape = tuple(_common.broadcast_shapes(t.shape, x.shape))
    except RuntimeError:
        shape = None
    if shape != tuple(x.shape):
        return f"{what} of shape {tuple(t.shape)} does not broadcast to x {tuple(x.shape)}"
    return None


@_common.memo_reason
def check(x, mask, dim, bias=None, fill=None) -> str | None:
    """Why the fused kernels cannot take ``x`` / ``mask`` (/ ``bias``, ``fill``) over
    ``dim``, or None."""
    r = _common.device_reason(x) or _common.dtype_reason(x)
    if r:
        return f"x: {r}"
    if isinstance(dim, bool) or not isinstance(dim, int):
        return f"dim {dim!r} is not an int"
    if x.dim() == 0:
        return "x is 0-d"
    if not -x.dim() <= dim < x.dim():
        return f"dim {dim} is out of range for a {x.dim()}-dim tensor"
    if mask is not None and (r := _broadcast_reason("mask", mask, x, _MASK_DTYPES)):
        return r
    if bias is not None and (r := _broadcast_reason("bias", bias, x, _common.SUPPORTED_DTYPES)):
        return r
    if fill is not None:
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
            return f"fill {fill!r} is not a float"
        if mask is None or mask.dtype != torch.bool:
            return "a fill value without a bool mask"
    if all(isinstance(s, int) for s in x.shape):
        n = x.shape[dim]
        rows = math.prod(x.shape) // n if n else 0
        if rows > MAX_ROWS:
            return f"{rows} rows exceed the launch grid limit {MAX_ROWS}"
    return None


@_common.memo_reason
def check_bwd(grad, out, dim, input_dtype, keep=None, mask=None) -> str | None:
    """Why the backward kernel cannot take (``grad``, ``out``, dropout ``keep``, the
    forward's bool ``mask``), or None."""
    r = check(grad, None, dim) or _common.device_reason(out) or _common.dtype_reason(out)
    if r:
        return r
    if grad.shape != out.shape or grad.device != out.device:
        return "grad and out differ in shape or device"
    if keep is not None and (
        keep.dtype != torch.bool or keep.shape != grad.shape or keep.device != grad.device
    ):
        return "the dropout keep mask is not a bool tensor shaped and placed as grad"
    if mask is not None:
        if mask.dtype != torch.bool:
            return f"mask is {mask.dtype}, not bool"
        if r := _broadcast_reason("mask", mask, grad, (torch.bool,)):
            return r
    if input_dtype not in _common.SUPPORTED_DTYPES:
        return f"input dtype {input_dtype} is not supported"
    return None


def reference(
    x: Tensor,
    scale: float,
    mask: Tensor | None,
    dim: int,
    bias: Tensor | None = None,
    fill: float | None = None,
    safe: bool = False,
) -> Tensor:
    """Eager: ``softmax(x * scale + mask)`` / ``softmax((x * scale + bias).masked_fill(mask,
    fill))`` (``fill`` -inf by default); ``safe``: ``_safe_softmax``, 0 on a row of all
    ``-inf``."""
    z = x * scale
    if bias is not None:
        z = z + bias
    if mask is not None and mask.dtype != torch.bool:
        z = z + mask
    if mask is not None and mask.dtype == torch.bool:
        z = z.masked_fill(mask, -math.inf if fill is None else fill)
    y = torch.softmax(z, dim)
    if safe:
        y = y.masked_fill((z == -math.inf).all(dim, keepdim=True), 0.0)
    return y.contiguous()


def _mode_key(a: Tensor | None, m: Tensor | None) -> int:
    """The kernel's operands as an int (tuning key, specs): bit 0 ``a`` added, bits 1-2
    ``m``'s :func:`_m_mode` (2: a bool mask, 4: a second added tensor)."""
    return (a is not None) + 2 * _m_mode(m)


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
    x: Tensor,
    scale: float,
    mask: Tensor | None,
    dim: int = -1,
    bias: Tensor | None = None,
    fill: float | None = None,
    dtype: torch.dtype | None = None,
    safe: bool = False,
    *,
    block_n: int | None = None,
) -> Tensor:
    """``softmax(x * scale + mask, dim)`` (bool mask: ``fill``, by default ``-inf``, where
    True, after adding ``bias``) in one pass.  Output contiguous, dtype :func:`out_dtype`
    or ``dtype`` (the fp32 result cast on store: ``softmax(...).to(dtype)``).  ``safe``:
    a row whose scores are all ``-inf`` gives 0 instead of NaN (``aten._safe_softmax``,
    attention's math path).  ``block_n`` (tests) forces a block."""
    reason = check(x, mask, dim, bias, fill) or _dtype_reason(dtype)
    if reason:
        raise ValueError(f"scale_mask_softmax_fwd: {reason}")
    return _fwd(x, scale, mask, dim, None, block_n, bias, fill, dtype, safe)[0]


def _dtype_reason(dtype: torch.dtype | None) -> str | None:
    if dtype is None or dtype in _common.SUPPORTED_DTYPES:
        return None
    return f"result dtype {dtype} is not one of {list(_common.SUPPORTED_DTYPES)}"


def _fwd(x, scale, mask, dim, dropout, block_n, bias=None, fill=None, dtype=None, safe=False):
    dim = _wrap_dim(dim, x.dim())
    shape = tuple(x.shape)
    o_dtype = dtype or out_dtype(x, mask, bias)
    probs = keep = None
    if dropout is not None:
        p, seed, drop_scale, write_probs, write_keep, cast = dropout
        y = _common.empty(shape, cast or o_dtype, x.device)
        probs = _common.empty(shape if write_probs else (0,), o_dtype, x.device)
        keep = _common.empty(shape if write_keep else (0,), torch.bool, x.device)
    else:
        y = _common.empty(shape, o_dtype, x.device)
        p, seed, drop_scale, write_probs, write_keep = 0.0, None, 1.0, False, False
    if math.prod(shape) == 0:
        return y, probs, keep
    n = shape[dim]
    rows = x.numel() // n
    add, mop = _operands(mask, bias)
    ts = [y, x]
    if add is not None:
        ts.append(add.expand(shape))
    if mop is not None:
        mx = mop.expand(shape)
        ts.append(mx.view(torch.uint8) if mop.dtype == torch.bool else mx)
    ts, g1, g2, strides = _plan(ts, dim)
    (y, x), (ys, xs) = ts[:2], strides[:2]
    a, as_ = (ts[2], strides[2]) if add is not None else (x, xs)
    m, ms = (ts[-1], strides[-1]) if mop is not None else (x, xs)
    fill_value = -math.inf if fill is None else float(fill)
    # probs / keep are allocated as y (contiguous, same shape): y's strides address them
    if write_probs:
        probs_arg = probs
    elif probs is not None and probs.dtype != y.dtype:  # unwritten, it types the rounding
        probs_arg = probs.new_empty((1,))  # before the dropout (cast to y's dtype)
    else:
        probs_arg = y
    keep_arg = keep.view(torch.uint8) if write_keep else y
    seed_arg = seed if seed is not None else y
    drop = dropout is not None

    def launch(cfg: autotune.Config, single: bool):
        _common.launch(_scale_mask_softmax_fwd_kernel, (rows,),
            y, x, a, m, n, g1, g2, *xs, *ys, *as_, *ms, float(scale), fill_value,
            seed_arg, probs_arg, keep_arg, p, drop_scale,
            HAS_ADD=add is not None, M_MODE=_m_mode(mop),
            DROPOUT=drop, WRITE_PROBS=write_probs, WRITE_KEEP=write_keep,
            SAFE=bool(safe), SINGLE=single, **cfg.as_kwargs(),
        )  # fmt: skip

    _launch(
        "scale_mask_softmax_dropout_fwd" if drop else "scale_mask_softmax_fwd",
        _scale_mask_softmax_fwd_kernel,
        n,
        rows,
        x.dtype,
        (y.dtype, probs_arg.dtype, _mode_key(add, mop), drop, write_probs, write_keep),
        xs[3] == 1,
        block_n,
        launch,
    )
    return y, probs, keep


def scale_mask_softmax_bwd(
    grad: Tensor,
    out: Tensor,
    scale: float,
    dim: int,
    input_dtype: torch.dtype,
    zero_nan: bool = False,
    keep: Tensor | None = None,
    drop_scale: float = 1.0,
    mask: Tensor | None = None,
    *,
    block_n: int | None = None,
) -> Tensor:
    """``scale * out * (g - sum(g * out, dim))`` in ``input_dtype`` (contiguous), where
    ``g = grad``, or ``grad * keep * drop_scale`` with a dropout's bool ``keep`` mask;
    ``zero_nan``: 0 where ``out`` is NaN (a bool mask's fully masked rows, as eager);
    ``mask``: 0 where the forward's bool mask (broadcast) is True (a finite fill)."""
    reason = check_bwd(grad, out, dim, input_dtype, keep, mask)
    if reason:
        raise ValueError(f"scale_mask_softmax_bwd: {reason}")
    dim = _wrap_dim(dim, grad.dim())
    shape = tuple(grad.shape)
    dx = _common.empty(shape, input_dtype, grad.device)
    if math.prod(shape) == 0:
        return dx
    n = shape[dim]
    rows = grad.numel() // n
    drop, masked = keep is not None, mask is not None
    ts = [dx, grad, out] + ([keep.view(torch.uint8)] if drop else [])
    ts += [mask.expand(shape).view(torch.uint8)] if masked else []
    ts, g1, g2, strides = _plan(ts, dim)
    dx, grad, out = ts[:3]
    k, ks = (ts[3], strides[3]) if drop else (out, strides[2])
    m, ms = (ts[-1], strides[-1]) if masked else (out, strides[2])

    def launch(cfg: autotune.Config, single: bool):
        _common.launch(_scale_mask_softmax_bwd_kernel, (rows,),
            dx, grad, out, n, g1, g2, *strides[0], *strides[1], *strides[2], float(scale),
            k, *ks, float(drop_scale), m, *ms,
            ZERO_NAN=zero_nan, DROPOUT=drop, MASKED=masked, SINGLE=single, **cfg.as_kwargs(),
        )  # fmt: skip

    _launch(
        "scale_mask_softmax_bwd",
        _scale_mask_softmax_bwd_kernel,
        n,
        rows,
        grad.dtype,
        (out.dtype, input_dtype, zero_nan, drop, masked),
        strides[1][3] == 1 and strides[2][3] == 1,
        block_n,
        launch,
    )
    return dx


# --- custom ops ------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::scale_mask_softmax",
    mutates_args=(),
    schema="(Tensor x, float scale, Tensor? mask, int dim=-1, Tensor? bias=None, "
    "float? fill=None, ScalarType? dtype=None, bool safe=False) -> Tensor",
)
@plans.planned("tile::scale_mask_softmax")
def scale_mask_softmax_op(x, scale, mask, dim=-1, bias=None, fill=None, dtype=None, safe=False):
    """``softmax(x * scale + mask, dim)``; a bool mask means ``masked_fill(mask, fill)``
    (``fill`` -inf by default) after adding ``bias``; the result cast to ``dtype`` when
    given (MPT in half: ``softmax(fp32 scores).to(half)``); ``safe``: 0 for a row of all
    ``-inf`` scores (``_safe_softmax``)."""
    args = (x, scale, mask, dim, bias, fill)

    def ref():
        y = reference(*args, safe)
        return y if dtype is None else y.to(dtype)

    if check(x, mask, dim, bias, fill) is not None or _dtype_reason(dtype) is not None:
        return ref()
    return _common.guarded(
        "scale_mask_softmax_fwd",
        key=(*_guard_key(x, mask, bias, fill), dtype, safe),
        run=lambda: scale_mask_softmax_fwd(*args, dtype, safe),
        fallback=ref,
    )


def _guard_key(x, mask, bias, fill) -> tuple:
    """What a kernel failure is remembered by: the dtypes and mask operands."""
    add, mop = _operands(mask, bias)
    return (
        x.dtype,
        None if add is None else add.dtype,
        None if mop is None else mop.dtype,
        fill is not None,
    )


@scale_mask_softmax_op.register_fake
def _(x, scale, mask, dim=-1, bias=None, fill=None, dtype=None, safe=False):
    return x.new_empty(x.shape, dtype=dtype or out_dtype(x, mask, bias))


def _reference_bwd(
    grad, out, scale, dim, input_dtype, zero_nan=False, keep=None, drop_scale=1.0, mask=None
):
    g, y = grad.to(torch.float32), out.to(torch.float32)
    if keep is not None:
        g = g * keep * drop_scale
    dx = scale * y * (g - (g * y).sum(dim, keepdim=True))
    if zero_nan:
        dx = dx.masked_fill(y.isnan(), 0.0)
    if mask is not None:
        dx = dx.masked_fill(mask, 0.0)
    return dx.to(input_dtype)


@torch.library.custom_op(
    "tile::scale_mask_softmax_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor out, float scale, int dim, ScalarType input_dtype, "
    "bool zero_nan=False, Tensor? keep=None, float drop_scale=1.0, Tensor? mask=None) "
    "-> Tensor",
)
@plans.planned("tile::scale_mask_softmax_backward")
def scale_mask_softmax_backward_op(
    grad, out, scale, dim, input_dtype, zero_nan=False, keep=None, drop_scale=1.0, mask=None
):
    """``scale * out * (g - sum(g * out, dim))`` in ``input_dtype`` with ``g = grad``, or
    ``grad * keep * drop_scale`` (the backward of a dropout after the softmax);
    ``zero_nan``: 0 where ``out`` is NaN (the fully masked rows of a bool mask: eager's
    masked_fill gives them a zero gradient); ``mask``: 0 where the forward's bool mask
    is True (a finite fill: the filled entries had no gradient)."""
    args = (grad, out, scale, dim, input_dtype, zero_nan, keep, drop_scale, mask)
    return _common.guarded_op(
        "scale_mask_softmax_bwd",
        check_bwd(grad, out, dim, input_dtype, keep, mask),
        key=(grad.dtype, out.dtype, input_dtype, zero_nan, keep is not None, mask is not None),
        run=lambda: scale_mask_softmax_bwd(*args),
        fallback=lambda: _reference_bwd(*args),
    )


@scale_mask_softmax_backward_op.register_fake
def _(grad, out, scale, dim, input_dtype, zero_nan=False, keep=None, drop_scale=1.0, mask=None):
    return grad.new_empty(grad.shape, dtype=input_dtype)


def _setup(ctx, inputs, output):
    x, scale, mask, dim = inputs[:4]
    bias, fill = (inputs[4:6] + (None, None))[:2]
    _remember(ctx, x, scale, mask, dim, bias, fill)
    ctx.save_for_backward(output, *([mask] if ctx.finite_fill else []))


def _remember(ctx, x, scale, mask, dim, bias, fill) -> None:
    """What the backward needs of the forward's arguments, besides saved tensors."""
    ctx.scale, ctx.dim, ctx.x_dtype = float(scale), dim, x.dtype
    ctx.z_dtype = out_dtype(x, mask, bias)  # the softmax input's dtype, in eager
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    # a finite fill leaves the filled entries a probability: their zero gradient is
    # applied from the mask (with -inf they have none; a fully masked row is NaN)
    ctx.finite_fill = fill is not None and not math.isinf(fill)


def _backward(ctx, grad):
    out, *mask = ctx.saved_tensors
    needs = (*ctx.needs_input_grad, False, False, False)  # (absent from a short call)
    gx, gmask, gbias = _backward_from(
        ctx, grad, out, (needs[0], needs[2], needs[4]), mask=mask[0] if mask else None
    )
    return gx, None, gmask, None, gbias, None, None, None


def _backward_from(ctx, grad, out, needs, keep=None, drop_scale=1.0, mask=None):
    """``(grad x, grad mask, grad bias)`` where ``needs`` says so: the added tensors'
    grads are the softmax input's, summed to their shapes."""
    need_x, need_mask, need_bias = needs
    need_mask = need_mask and ctx.mask_dtype not in (None, torch.bool)
    need_bias = need_bias and ctx.bias_dtype is not None
    gx = gmask = gbias = None
    op = torch.ops.tile.scale_mask_softmax_backward
    zero_nan = ctx.mask_dtype == torch.bool and mask is None
    extra = {"keep": keep, "drop_scale": drop_scale, "mask": mask}
    if need_mask or need_bias:  # d(softmax input) once, in the output dtype; grads from it
        dz = op(grad, out, 1.0, ctx.dim, ctx.z_dtype, zero_nan, **extra)
        if need_mask:
            gmask = dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
        if need_bias:
            gbias = dz.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        if need_x:
            gx = (dz * ctx.scale).to(ctx.x_dtype)
    elif need_x:
        gx = op(grad, out, ctx.scale, ctx.dim, ctx.x_dtype, zero_nan, **extra)
    return gx, gmask, gbias


torch.library.register_autograd("tile::scale_mask_softmax", _backward, setup_context=_setup)


# --- aten._safe_softmax on its own ------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


@_common.memo_reason
def check_safe(x, dim, dtype=None) -> str | None:
    """Why :func:`safe_softmax_op` cannot run ``aten._safe_softmax(x, dim, dtype)`` in the
    kernel, or None."""
    r = check(x, None, dim)
    if r:
        return r
    if dtype is not None and dtype != x.dtype and not (dtype == torch.float32 and x.dtype in _HALF):
        return f"dtype={dtype} for a {x.dtype} input (only a half input's fp32 result is fused)"
    return None


@torch.library.custom_op(
    "tile::safe_softmax",
    mutates_args=(),
    schema="(Tensor x, int dim, ScalarType? dtype=None) -> Tensor",
)
@plans.planned("tile::safe_softmax")
def safe_softmax_op(x: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """Mirrors ``aten::_safe_softmax(Tensor self, int dim, ScalarType? dtype=None)``: the
    softmax, 0 on a row of all ``-inf`` (attention's math path, where such a row is a
    fully masked query).  The fused kernel with no prologue; the fusion pass gives it
    its scale and masks."""
    aten_op = torch.ops.aten._safe_softmax.default
    if check_safe(x, dim, dtype) is not None:
        return aten_op(x, dim, dtype)
    return _common.guarded(
        "scale_mask_softmax_fwd",
        key=(*_guard_key(x, None, None, None), dtype, True),
        run=lambda: scale_mask_softmax_fwd(x, 1.0, None, dim, dtype=dtype, safe=True),
        fallback=lambda: aten_op(x, dim, dtype),
    )


@safe_softmax_op.register_fake
def _(x, dim, dtype=None):
    return torch.ops.aten._safe_softmax.default(x, dim, dtype)


# its backward is ATen's too: the softmax backward of the result (0 on the all -inf rows,
# so is their gradient), as tile::softmax's (the same three inputs: x, dim, and a dtype)
torch.library.register_autograd(
    "tile::safe_softmax", _softmax_grad, setup_context=_softmax_setup_context
)


# --- compile-for-Hopper specs ------------------------------------------------------------

_INT_FWD = ("N", "G1", "G2") + tuple(f"{p}_s{i}" for p in ("x", "y", "a", "m") for i in "012n")
_INT_BWD = ("N", "G1", "G2") + tuple(f"{p}_s{i}" for p in ("dx", "dy", "y") for i in "012n")


def _spec(
    fwd: bool,
    dt: torch.dtype,
    mode: int,
    single: bool,
    cfg: autotune.Config,
    drop=False,
    probs: torch.dtype | None = None,
    safe: bool = False,
) -> dict:
    """``mode`` as :func:`_mode_key`: bit 0 an added tensor, 2 a bool mask (in the
    backward: the mask read for a finite fill), 4 a second added tensor; ``probs`` the
    dtype of the probabilities a dropout writes, or the backward reads (default ``dt``:
    no cast between)."""
    t = "*" + _common.triton_dtype_name(dt)
    has_add, m_mode = bool(mode & 1), mode >> 1
    has_fill = m_mode == 1
    if fwd:
        fn = _scale_mask_softmax_fwd_kernel
        sig = {"y_ptr": t, "x_ptr": t, "a_ptr": t, "m_ptr": "*u8" if has_fill else t}
        ints, unit = _INT_FWD, ("x_sn", "y_sn", "a_sn", "m_sn")
        consts = {
            "HAS_ADD": has_add,
            "M_MODE": m_mode,
            "DROPOUT": drop,
            "WRITE_PROBS": drop,
            "WRITE_KEEP": drop,
            "SAFE": safe,
        }
    else:
        fn = _scale_mask_softmax_bwd_kernel
        y = t if probs is None else "*" + _common.triton_dtype_name(probs)
        sig = {"dx_ptr": t, "dy_ptr": t, "y_ptr": y}
        ints, unit = _INT_BWD, ("dx_sn", "dy_sn", "y_sn", "k_sn", "m_sn")
        consts = {"ZERO_NAN": has_fill, "DROPOUT": drop, "MASKED": has_fill}
    sig.update({a: "i32" for a in ints if a not in unit})
    sig["scale"] = "fp32"
    if not fwd:
        sig["k_ptr"] = "*u8" if drop else t
        sig.update({f"k_s{i}": "i32" for i in "012"})
        sig["drop_scale"] = "fp32"
        sig["m_ptr"] = "*u8" if has_fill else t
        sig.update({f"m_s{i}": "i32" for i in "012"})
    if fwd:
        sig["fill"] = "fp32"
        sig.update(
            seed_ptr="*i64" if drop else t,
            probs_ptr=t if probs is None else "*" + _common.triton_dtype_name(probs),
            keep_ptr="*u8" if drop else t,
            p="fp32",
            drop_scale="fp32",
        )
    consts.update({u: 1 for u in unit})
    consts.update({"SINGLE": single, **dict(cfg.kwargs)})
    kind = "fwd" if fwd else "bwd"
    kind += "_dropout" if drop else ""
    kind += f"_probs_{probs}" if probs is not None else ""
    kind += "_safe" if safe else ""
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
    heavy = ((True, heavy_s), (False, heavy_l))
    for dt in _common.SUPPORTED_DTYPES:
        for mode in (0, 2, 3, 5):
            specs += [_spec(True, dt, mode, True, heavy_s), _spec(True, dt, mode, False, heavy_l)]
        # _safe_softmax (attention's math path: an added mask), also before a dropout
        for drop in (False, True):
            specs += [_spec(True, dt, 1, s, c, drop, safe=True) for s, c in heavy]
        specs += [_spec(False, dt, 2, True, heavy_s), _spec(False, dt, 2, False, heavy_l)]
        # dropout: every single-block and looped config, with a bool mask
        specs += [_spec(True, dt, 2, True, c, drop=True) for c in single]
        specs += [_spec(True, dt, 2, False, c, drop=True) for c in looped]
        specs += [_spec(False, dt, 0, True, c, drop=True) for c in single]
        specs += [_spec(False, dt, 0, False, c, drop=True) for c in looped]
        if dt != torch.float32:  # T5: fp32 probabilities cast to half before the dropout
            specs.append(_spec(True, dt, 5, True, heavy_s, drop=True, probs=torch.float32))
            specs.append(_spec(True, dt, 5, False, heavy_l, drop=True, probs=torch.float32))
            # backward from fp32 probabilities to the half scores (Llama's eager attention)
            for drop in (False, True):
                specs += [_spec(False, dt, 0, s, c, drop, probs=torch.float32) for s, c in heavy]
    return specs
