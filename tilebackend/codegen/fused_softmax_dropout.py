"""Dropout fused with the softmax: ``tile::scale_mask_softmax_dropout``.

``dropout(softmax(x * scale + mask, dim).to(cast), p)`` in the pass of
:mod:`.fused_softmax`'s forward kernel (``DROPOUT``): the keep mask is ``rand(seed, i) > p``
(Philox, keyed by a seed tensor drawn from torch's generator, so ``torch.manual_seed``
makes runs repeat, and by the element's flat index), the output
``y * where(keep, 1 / (1 - p), 0)`` (a NaN row stays NaN, as in eager); the probabilities
and the mask are written too when the backward needs them.  Like Inductor's, the random
stream is not eager's.  This module holds the host launcher, the ATen reference, the
custom op and its autograd; the kernels and the backward op are :mod:`.fused_softmax`'s.
"""

from __future__ import annotations

import torch

from . import _common, plans
from .fused_softmax import (
    _backward_from,
    _dtype_reason,
    _fwd,
    _guard_key,
    _remember,
    check,
    out_dtype,
    reference,
)

Tensor = torch.Tensor

__all__ = ["check_dropout", "reference_dropout", "scale_mask_softmax_dropout_fwd"]


def scale_mask_softmax_dropout_fwd(
    x: Tensor,
    scale: float,
    mask: Tensor | None,
    dim: int,
    p: float,
    seed: Tensor,
    write_probs: bool = True,
    write_keep: bool = True,
    drop_scale: float | None = None,
    bias: Tensor | None = None,
    fill: float | None = None,
    dtype: torch.dtype | None = None,
    cast: torch.dtype | None = None,
    safe: bool = False,
    *,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``dropout(softmax(x * scale + mask, dim).to(cast), p)`` in one pass:
    ``(out, probs, keep)``.

    ``keep = rand(seed, i) > p`` for the element at flat index ``i`` of the (contiguous)
    output, ``out = probs * where(keep, drop_scale, 0)`` with ``drop_scale = 1 / (1 - p)``
    by default.  ``probs`` (the softmax, as :func:`scale_mask_softmax_fwd` gives it) and
    ``keep`` (bool) are written only when asked, else they are empty ``[0]`` tensors.
    ``seed`` is a one-element int64 tensor on ``x``'s device (read by the kernel: no sync).
    ``bias``, ``fill`` and ``dtype`` (the probabilities') are as in
    :func:`scale_mask_softmax_fwd`; ``cast`` (default: the probabilities' dtype) is the
    dtype the probabilities are cast to before the dropout, and ``out``'s (T5 in half
    precision: ``dropout(softmax(scores.float()).type_as(scores))``).  ``safe``: the
    softmax is ``_safe_softmax`` (0 on a row of all ``-inf``).
    """
    reason = (
        check_dropout(x, mask, dim, p, seed, bias, fill)
        or _dtype_reason(dtype)
        or _dtype_reason(cast)
    )
    if reason:
        raise ValueError(f"scale_mask_softmax_dropout_fwd: {reason}")
    ds = 1.0 / (1.0 - p) if drop_scale is None else float(drop_scale)
    drop = (float(p), seed, ds, write_probs, write_keep, cast)
    return _fwd(x, scale, mask, dim, drop, block_n, bias, fill, dtype, safe)


@_common.memo_reason
def check_dropout(x, mask, dim, p, seed, bias=None, fill=None) -> str | None:
    """Why the fused dropout kernel cannot take the case, or None."""
    r = check(x, mask, dim, bias, fill)
    if r:
        return r
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        return f"dropout probability {p!r} is not in (0, 1)"
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        return "seed is not a one-element int64 tensor"
    if seed.device != x.device:
        return f"seed on {seed.device}, x on {x.device}"
    return None


# --- the op ---------------------------------------------------------------------------


def reference_dropout(
    x, scale, mask, dim, p, seed, write_probs, write_keep, drop_scale, bias=None, fill=None,
    dtype=None, cast=None, safe=False,
):  # fmt: skip
    """ATen fallback of ``tile::scale_mask_softmax_dropout``: the same semantics (a keep
    probability of ``1 - p``, outputs consistent with each other), a different random
    stream (a CPU generator seeded with ``seed``)."""
    probs = reference(x, scale, mask, dim, bias, fill, safe)
    probs = probs if dtype is None else probs.to(dtype)
    gen = torch.Generator().manual_seed(int(seed.item()) & (2**63 - 1))
    keep = (torch.rand(probs.shape, generator=gen) > p).to(probs.device)
    y = probs if cast is None else probs.to(cast)
    y = (y * torch.where(keep, drop_scale, 0.0)).to(y.dtype)  # (a NaN stays NaN, as eager)
    empty = probs.new_empty((0,))
    return (
        y,
        probs if write_probs else empty,
        keep if write_keep else empty.to(torch.bool),
    )


@torch.library.custom_op(
    "tile::scale_mask_softmax_dropout",
    mutates_args=(),
    schema="(Tensor x, float scale, Tensor? mask, int dim, float p, Tensor seed, "
    "bool write_probs, bool write_keep, float drop_scale, Tensor? bias=None, "
    "float? fill=None, ScalarType? dtype=None, ScalarType? cast=None, bool safe=False) "
    "-> (Tensor, Tensor, Tensor)",
)
@plans.planned("tile::scale_mask_softmax_dropout")
def scale_mask_softmax_dropout_op(
    x, scale, mask, dim, p, seed, write_probs, write_keep, drop_scale, bias=None, fill=None,
    dtype=None, cast=None, safe=False,
):  # fmt: skip
    """``dropout(softmax(x * scale + mask, dim).to(cast), p)`` -> ``(out, probs, keep)``;
    ``probs`` (in ``dtype``, as ``tile::scale_mask_softmax`` stores it) and ``keep`` are
    empty unless asked for (the backward needs them); ``out`` is in ``cast``, by default
    the probabilities' dtype.  ``bias`` and ``fill`` as in ``tile::scale_mask_softmax``.
    Placed by the fusion pass in graphs whose autograd is done; it has a backward for
    direct use."""
    args = (x, scale, mask, dim, p, seed, write_probs, write_keep, drop_scale, bias, fill)
    args += (dtype, cast, safe)
    return _common.guarded_op(
        "scale_mask_softmax_dropout_fwd",
        check_dropout(x, mask, dim, p, seed, bias, fill)
        or _dtype_reason(dtype)
        or _dtype_reason(cast),
        key=(*_guard_key(x, mask, bias, fill), write_probs, write_keep, dtype, cast, safe),
        run=lambda: scale_mask_softmax_dropout_fwd(*args),
        fallback=lambda: reference_dropout(*args),
    )


@scale_mask_softmax_dropout_op.register_fake
def _(
    x, scale, mask, dim, p, seed, write_probs, write_keep, drop_scale, bias=None, fill=None,
    dtype=None, cast=None, safe=False,
):  # fmt: skip
    dt = dtype or out_dtype(x, mask, bias)
    return (
        x.new_empty(x.shape, dtype=cast or dt),
        x.new_empty(x.shape if write_probs else (0,), dtype=dt),
        x.new_empty(x.shape if write_keep else (0,), dtype=torch.bool),
    )


def _setup_dropout(ctx, inputs, output):
    x, scale, mask, dim, _p, _seed, write_probs, write_keep, drop_scale = inputs[:9]
    bias, fill = (inputs[9:11] + (None, None))[:2]
    _remember(ctx, x, scale, mask, dim, bias, fill)
    ctx.drop_scale, ctx.complete = float(drop_scale), write_probs and write_keep
    ctx.save_for_backward(output[1], output[2], *([mask] if ctx.finite_fill else []))


def _backward_dropout(ctx, grad, _gprobs, _gkeep):
    if not ctx.complete:
        raise RuntimeError(
            "tile::scale_mask_softmax_dropout: backward needs write_probs=True and "
            "write_keep=True (the probabilities and the keep mask)"
        )
    probs, keep, *mask = ctx.saved_tensors
    needs = (*ctx.needs_input_grad, False, False)
    gx, gmask, gbias = _backward_from(
        ctx, grad, probs, (needs[0], needs[2], needs[9]), keep, ctx.drop_scale,
        mask[0] if mask else None,
    )  # fmt: skip
    return gx, None, gmask, None, None, None, None, None, None, gbias, None, None, None, None


torch.library.register_autograd(
    "tile::scale_mask_softmax_dropout", _backward_dropout, setup_context=_setup_dropout
)
