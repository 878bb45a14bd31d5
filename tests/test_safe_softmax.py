"""``aten._safe_softmax``, the softmax of attention's math path (an SDPA whose mask needs
a gradient, or one on the CPU): a row of scores that are all ``-inf`` (a fully masked
query) gives 0, not NaN.  It runs in the fused softmax kernel (``SAFE``), alone
(``tile::safe_softmax``), with its mask add fused, and before a fused dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilebackend
from tilebackend.codegen import _common, fused_softmax, fused_softmax_dropout

aten = torch.ops.aten


def _scores(device, dtype, n=37):
    x = torch.randn(2, 3, n, device=device)
    x[0, 1] = -math.inf  # fully masked: 0
    x[1, 2, 5:] = -math.inf  # partly masked: a softmax over the first 5
    x[1, 0] = -math.inf
    x[1, 0, 7] = math.nan  # a NaN among -inf: the row is NaN, as eager's
    return x.to(dtype)


@pytest.mark.parametrize("block_n", [None, 8], ids=["single", "looped"])
@pytest.mark.parametrize(
    "dtype, out_dtype, tol",
    [
        (torch.float32, None, 1e-5),
        (torch.float16, None, 2e-3),
        (torch.bfloat16, None, 1e-2),
        (torch.float16, torch.float32, 1e-5),  # a half input's fp32 result
    ],
    ids=["fp32", "fp16", "bf16", "fp16_to_fp32"],
)
def test_safe_softmax_kernel_and_op(poison, device, block_n, dtype, out_dtype, tol):
    x = _scores(device, dtype).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    ref = aten._safe_softmax(ref_x, -1)
    expect_dtype = aten._safe_softmax(x.detach(), -1, out_dtype).dtype
    if block_n is not None:  # the launcher, forced to loop over each row
        y = fused_softmax.scale_mask_softmax_fwd(
            x.detach(), 1.0, None, -1, dtype=out_dtype, safe=True, block_n=block_n
        )
    else:
        with _common.count_launches() as n:
            y = torch.ops.tile.safe_softmax(x, -1, out_dtype)
        assert dict(n) == {"scale_mask_softmax_fwd": 1}
    assert y.dtype == expect_dtype
    torch.testing.assert_close(y.double(), ref.detach(), atol=tol, rtol=tol, equal_nan=True)
    assert (y[0, 1] == 0).all() and y[1, 0].isnan().all()
    assert not y[1, 2, 5:].any() and not y[1, 2, :5].isnan().any()
    if block_n is not None:
        return
    g = torch.randn_like(y)
    with _common.count_launches() as n:
        (gx,) = torch.autograd.grad(y, x, g)
    assert dict(n) == {"softmax_bwd": 1}
    (gref,) = torch.autograd.grad(ref, ref_x, g.double())
    assert gx.dtype == dtype and (gx[0, 1] == 0).all()
    gtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # gx's
    torch.testing.assert_close(gx.double(), gref, atol=gtol, rtol=gtol, equal_nan=True)


def test_safe_softmax_with_a_mask_and_a_dropout(poison, device):
    """The fused kernel's prologue and dropout keep the safe rows 0: an additive mask
    that masks a whole row, then a dropout (its probabilities 0 there too)."""
    x = torch.randn(2, 3, 5, 11, device=device)
    mask = torch.randn(2, 1, 5, 11, device=device)
    mask[1, 0, 2] = -math.inf
    y = fused_softmax.scale_mask_softmax_fwd(x, 0.5, mask, -1, safe=True)
    ref = aten._safe_softmax(x * 0.5 + mask, -1)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    assert (y[1, :, 2] == 0).all()
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    out, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 0.5, mask, -1, 0.25, seed, safe=True
    )
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch.where(keep, probs / 0.75, 0.0), atol=1e-6, rtol=1e-5)
    assert (out[1, :, 2] == 0).all() and not out.isnan().any()
    # the reference (the ops' fallback) is safe too
    ref2 = fused_softmax_dropout.reference_dropout(
        x, 0.5, mask, -1, 0.25, seed, True, True, 4 / 3, safe=True
    )
    assert (ref2[0][1, :, 2] == 0).all() and (ref2[1][1, :, 2] == 0).all()


def _bias_with_a_masked_row():
    bias = torch.randn(1, 2, 5, 5)
    bias[..., 1, :] = -math.inf  # query 1 sees nothing: eager's math path gives it 0
    return bias.requires_grad_()


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_sdpa_math_path_trains_with_one_softmax_kernel_each_way(poison, fallback):
    """An SDPA whose mask needs a gradient (T5's position bias) takes the math path:
    its mask add and ``_safe_softmax`` are one forward kernel, the backward one kernel;
    the fully masked query gives 0 and a zero gradient, as eager's; the mask's gradient
    is eager's."""
    torch.manual_seed(0)
    bias = _bias_with_a_masked_row()
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        out = torch.compile(fn, backend=backend)(q, k, v)
        out.square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    ref = fn(q, k, v)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not out.isnan().any()
    for a, t in zip(got, (q, k, v, bias), strict=True):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)
    assert launches["scale_mask_softmax_fwd"] == 1 and launches["softmax_bwd"] == 1
    assert "softmax_fwd" not in launches, dict(launches)
    counts = backend.report.counts
    assert counts["safe_softmax"] == 1 and counts["fused_scale_mask_softmax"] == 1, counts
    fused = [r for g in backend.report.graphs for r in g.replacements if r.scalars.get("safe")]
    assert len(fused) == 1 and "add.Tensor" in fused[0].targets, str(backend.report)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_sdpa_math_path_dropout_is_fused_and_safe(poison, fallback):
    """With dropout the math path's softmax, its mask add and the dropout are one kernel,
    the backward one kernel; the fully masked query stays 0, never NaN; given the
    kernel's keep mask, the numbers are eager's math path."""
    torch.manual_seed(0)
    bias = _bias_with_a_masked_row()
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.3)

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        out = torch.compile(fn, backend=backend)(q, k, v)
        out.sum().backward()
    assert dict(launches)["scale_mask_softmax_dropout_fwd"] == 1, dict(launches)
    assert launches["scale_mask_softmax_bwd"] == 1, dict(launches)
    assert backend.report.counts["fused_softmax_dropout"] == 1, str(backend.report)
    assert not out.isnan().any() and not q.grad.isnan().any() and not bias.grad.isnan().any()
    assert (out[:, :, 1] == 0).all() and (bias.grad[..., 1, :] == 0).all()


def test_safe_softmax_a_kernel_cannot_do_is_left_with_its_reason(poison):
    """``dtype=`` narrowing an fp32 input is not fused: left to ATen, named, eager's
    numbers."""

    def fn(x):
        return aten._safe_softmax(x * 2, -1, torch.float16)

    x = _scores("cpu", torch.float32)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with _common.count_launches() as launches:
        y = torch.compile(fn, backend=backend)(x)
    torch.testing.assert_close(y, fn(x), equal_nan=True)
    assert not launches
    left = [s for g in backend.report.graphs for s in g.skipped if s.pattern == "safe_softmax"]
    assert left and "dtype=torch.float16 for a torch.float32 input" in left[0].reason
