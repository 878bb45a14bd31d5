"""Dropout fused with the softmax (attention written out, as HF's eager attention does it):
``dropout(softmax(x * scale + mask))`` is one forward kernel, its backward one kernel, in
both forms a graph holds a dropout (``native_dropout`` with the eager fallback, Inductor's
decomposition with its seed ops); the numbers match eager given the kernel's keep mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tilebackend
from tilebackend.codegen import _common, fused_softmax, fused_softmax_dropout

P = 0.25


def _seed(device, value=1234):
    return torch.tensor([value], dtype=torch.int64, device=device)


FP32, FP16, BF16 = (
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 8e-3, 1e-2),
)


@pytest.mark.parametrize(
    "dtype, atol, rtol, mask_kind, block_n",  # block_n None: a row in one block; 16: looped
    [(*dt, "additive", None) for dt in (FP32, FP16, BF16)]
    + [(*FP32, kind, None) for kind in ("none", "bool")]
    + [(*FP32, kind, 16) for kind in ("none", "additive", "bool")]
    + [(*BF16, "bool", 16)],
)
def test_dropout_kernel(poison, device, dtype, atol, rtol, mask_kind, block_n):
    x = torch.randn(3, 4, 37, device=device, dtype=dtype)
    mask = {
        "none": None,
        "additive": torch.randn(3, 1, 37, device=device, dtype=dtype),
        "bool": torch.rand(1, 4, 37, device=device) > 0.7,
    }[mask_kind]
    # poisoned outputs: an element the kernel leaves unwritten is NaN and fails below
    y, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 0.5, mask, -1, P, _seed(device), block_n=block_n
    )
    ref = fused_softmax.reference(x.float(), 0.5, mask, -1).to(y.dtype)
    torch.testing.assert_close(probs, ref, atol=atol, rtol=rtol)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    expect = torch.where(keep, probs.float() / (1 - P), 0.0).to(dtype)
    torch.testing.assert_close(y, expect, atol=atol, rtol=rtol)
    # the same seed draws the same mask, whatever is written; another seed another one
    y2, p2, k2 = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 0.5, mask, -1, P, _seed(device), False, False, block_n=block_n
    )
    assert p2.numel() == 0 and k2.numel() == 0
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    _, _, k3 = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 0.5, mask, -1, P, _seed(device, 99), block_n=block_n
    )
    assert not torch.equal(k3, keep)


def test_dropout_keeps_one_minus_p(device):
    x = torch.randn(64, 301, device=device)
    _, _, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 1.0, None, -1, P, _seed(device)
    )
    assert abs(keep.float().mean().item() - (1 - P)) < 0.02
    # no structure across rows or columns: each row and column keeps about the same share
    assert keep.float().mean(1).std() < 0.1 and keep.float().mean(0).std() < 0.1


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (1, 1), (2, 3, 1)])
def test_dropout_kernel_edge_sizes(poison, device, shape):
    x = torch.randn(shape, device=device)
    y, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 1.0, None, -1, P, _seed(device)
    )
    assert y.shape == probs.shape == keep.shape == x.shape
    torch.testing.assert_close(probs, torch.softmax(x, -1))
    torch.testing.assert_close(y, torch.where(keep, probs / (1 - P), 0.0))


def test_dropout_kernel_non_contiguous(poison, device):
    x = torch.randn(5, 3, 11, device=device).transpose(0, 2)  # [11, 3, 5], softmax over 5
    y, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 2.0, None, -1, P, _seed(device)
    )
    torch.testing.assert_close(probs, torch.softmax(x * 2.0, -1))
    torch.testing.assert_close(y, torch.where(keep, probs / (1 - P), 0.0))


def test_dropout_kernel_refuses_what_it_cannot_do(device):
    x = torch.randn(2, 8, device=device)
    assert "not in (0, 1)" in fused_softmax_dropout.check_dropout(x, None, -1, 1.0, _seed(device))
    assert "int64" in fused_softmax_dropout.check_dropout(x, None, -1, 0.5, torch.zeros(1))
    with pytest.raises(ValueError, match="not in"):
        fused_softmax_dropout.scale_mask_softmax_dropout_fwd(x, 1.0, None, -1, 0.0, _seed(device))


def test_backward_kernel_through_the_keep_mask(poison, device):
    x = torch.randn(6, 29, device=device)
    y, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x, 0.5, None, -1, P, _seed(device)
    )
    g = torch.randn_like(y)
    dx = fused_softmax.scale_mask_softmax_bwd(
        g, probs, 0.5, -1, torch.float32, keep=keep, drop_scale=1 / (1 - P), block_n=8
    )
    xr = x.clone().requires_grad_()
    (torch.softmax(xr * 0.5, -1) * keep / (1 - P)).backward(g)
    torch.testing.assert_close(dx, xr.grad)


def test_op_autograd_matches_eager_with_its_mask(device):
    x = torch.randn(2, 3, 13, device=device, requires_grad=True)
    m = torch.randn(2, 1, 13, device=device, requires_grad=True)
    op = torch.ops.tile.scale_mask_softmax_dropout
    with _common.count_launches() as n:
        y, _, keep = op(x, 0.125, m, -1, P, _seed(device), True, True, 1 / (1 - P))
        g = torch.randn_like(y)
        y.backward(g)
    assert dict(n) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
    xr, mr = x.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    ref = torch.softmax(xr * 0.125 + mr, -1) * keep / (1 - P)
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(m.grad, mr.grad)


@pytest.mark.parametrize("block_n", [None, 4])
def test_op_with_bias_and_finite_fill(poison, device, block_n):
    """MPT's prologue with dropout after it: the probabilities are the bias-added,
    finitely filled softmax's (an all-masked row uniform), and the gradients of x and the
    bias go through the keep mask and zero the filled entries."""
    x = torch.randn(2, 3, 11, device=device, requires_grad=True)
    bias = torch.randn(3, 1, device=device, requires_grad=True)
    m = torch.rand(2, 1, 11, device=device) < 0.3
    m[0, 0] = True
    fill = torch.finfo(torch.float32).min
    y, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(
        x.detach(), 0.125, m, -1, P, _seed(device), bias=bias.detach(), fill=fill,
        block_n=block_n,
    )  # fmt: skip
    ref = torch.softmax((x * 0.125 + bias).masked_fill(m, fill), -1)
    torch.testing.assert_close(probs, ref.detach())
    torch.testing.assert_close(y, torch.where(keep, ref.detach() / (1 - P), 0.0))
    op = torch.ops.tile.scale_mask_softmax_dropout
    with _common.count_launches() as n:
        y2, _, k2 = op(x, 0.125, m, -1, P, _seed(device), True, True, 1 / (1 - P), bias, fill)
        g = torch.randn_like(y2)
        y2.backward(g)
    assert dict(n) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
    assert torch.equal(k2, keep)  # the same seed, the same draws
    gx, gb = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    (ref * k2 / (1 - P)).backward(g)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gb, bias.grad)
    assert (gx[0] == 0).all()


# --- through the backend ----------------------------------------------------------------


def attention_probs(scores, mask):
    """HF's eager attention, written out: scale, additive mask, softmax, dropout."""
    return F.dropout(torch.softmax(scores * 0.125 + mask, dim=-1), p=P, training=True)


def _compile(fallback):
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    return torch.compile(attention_probs, backend=backend), backend


@pytest.mark.parametrize("block_n", [None, 4])
def test_fully_masked_rows_stay_nan_where_dropped(poison, device, block_n):
    """A row masked with -inf everywhere has a NaN softmax; eager's dropout multiplies by
    the mask, so the dropped entries stay NaN (NaN * 0), and so do their gradients.  The
    kernel wrote 0 there; the ATen fallback of the op agrees with both."""
    x = torch.randn(2, 3, 6, device=device)
    m = torch.zeros(2, 1, 6, device=device)
    m[0] = float("-inf")
    args = (x, 0.5, m, -1, P, _seed(device))
    y, probs, keep = fused_softmax_dropout.scale_mask_softmax_dropout_fwd(*args, block_n=block_n)
    assert (~keep[0]).any() and torch.isnan(y[0]).all() and torch.isnan(probs[0]).all()
    assert not torch.isnan(y[1]).any()
    y_ref, _, _ = fused_softmax_dropout.reference_dropout(*args, True, True, 1 / (1 - P))
    assert torch.isnan(y_ref[0]).all()
    g = torch.randn_like(y)
    dx = fused_softmax.scale_mask_softmax_bwd(
        g, probs, 0.5, -1, torch.float32, keep=keep, drop_scale=1 / (1 - P), block_n=block_n
    )
    assert torch.isnan(dx[0]).all() and not torch.isnan(dx[1]).any()


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_training_forward_and_backward_are_one_kernel_each(poison, fallback):
    x = torch.randn(2, 3, 7, 11, requires_grad=True)
    mask = torch.randn(2, 1, 7, 11)
    compiled, backend = _compile(fallback)
    g = torch.randn(2, 3, 7, 11)
    with _common.count_launches() as launches:
        y = compiled(x, mask)
        y.backward(g)
    assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
    counts = backend.report.counts
    assert counts["fused_softmax_dropout"] == 1 and counts["fused_softmax_backward"] == 1
    fwd, bwd = (g_ for g_ in backend.report.graphs if g_.name in ("forward", "backward"))
    for op in ("native_dropout", "inductor_random", "aten.gt", "aten.mul", "aten.add"):
        assert op not in fwd.code and op not in bwd.code, (op, fwd.code, bwd.code)
    # eager with the kernel's keep mask (a probability is never 0 here: keep = y != 0)
    keep = y.detach() != 0
    assert 0.5 < keep.float().mean() < 0.95
    xr = x.detach().clone().requires_grad_()
    ref = torch.softmax(xr * 0.125 + mask, -1) * keep / (1 - P)
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)], ids=["fp16", "bf16"]
)
def test_half_training_is_one_kernel_each_way(poison, fallback, dtype, tol):
    """GPT-2 / BERT in half precision: Inductor's dropout casts its random draw to half
    before comparing it with p; that form fuses too (the kernel compares its fp32 draw)."""
    x = torch.randn(2, 3, 7, 11, dtype=dtype, requires_grad=True)
    mask = torch.randn(2, 1, 7, 11, dtype=dtype)
    compiled, backend = _compile(fallback)
    g = torch.randn(2, 3, 7, 11, dtype=dtype)
    with _common.count_launches() as launches:
        y = compiled(x, mask)
        y.backward(g)
    assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
    assert y.dtype == dtype
    keep = y.detach() != 0
    assert 0.5 < keep.float().mean() < 0.95
    xr = x.detach().clone().requires_grad_()
    w = torch.softmax(xr * 0.125 + mask, -1)
    ref = torch.where(keep, w * (1 / (1 - P)), torch.zeros((), dtype=dtype))
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad, xr.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_mpt_attention_dropout_trains_in_one_kernel_each_way(poison, fallback):
    """MPT's prologue (ALiBi bias, finite fill) with a dropout after the softmax: one
    launch each way; the gradients are eager's with the kernel's keep mask."""
    fill = torch.finfo(torch.float32).min

    def fn(x, bias, m):
        z = (x * 0.125 + bias).masked_fill(m, fill)
        return F.dropout(torch.softmax(z, -1), p=P, training=True)

    x = torch.randn(2, 3, 7, 11, requires_grad=True)
    bias = torch.randn(3, 1, 11)
    m = torch.rand(2, 1, 7, 11) < 0.3
    m[0, 0, 3] = True  # an all-masked row: uniform probabilities, no gradient
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    g = torch.randn(2, 3, 7, 11)
    with _common.count_launches() as launches:
        y = torch.compile(fn, backend=backend)(x, bias, m)
        y.backward(g)
    assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
    assert backend.report.counts["fused_softmax_dropout"] == 1, str(backend.report)
    xr = x.detach().clone().requires_grad_()
    probs = torch.softmax((xr * 0.125 + bias).masked_fill(m, fill), -1)
    keep = y.detach() != 0  # a filled entry's probability is 0 either way
    ref = probs * keep / (1 - P)
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)
    assert (x.grad[0, :, 3] == 0).all()


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)], ids=["fp16", "bf16"]
)
def test_t5_upcast_softmax_cast_back_then_dropout(poison, fallback, dtype, tol):
    """T5 in half precision: ``dropout(softmax(scores.float()).type_as(scores))`` with
    its two added tensors.  The forward is one kernel (it writes the fp32 probabilities
    the backward saves, and the dropout's half result, rounded as the cast and the
    dropout round); the numbers are eager's given the kernel's keep mask."""

    def fn(s, pos, m):
        scores = s + pos + m
        w = torch.softmax(scores.float(), dim=-1).type_as(scores)
        return F.dropout(w, p=P, training=True)

    s = torch.randn(2, 3, 7, 11, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, 3, 7, 11, dtype=dtype)
    m = torch.where(torch.rand(2, 1, 1, 11) < 0.2, -1e4, 0.0).to(dtype)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    g = torch.randn(2, 3, 7, 11, dtype=dtype)
    with _common.count_launches() as launches:
        y = torch.compile(fn, backend=backend)(s, pos, m)
        y.backward(g)
    # one kernel each way: the backward reads the half gradient through the keep mask
    assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
    (rep,) = [
        r for gr in backend.report.graphs for r in gr.replacements
        if r.pattern == "fused_softmax_dropout"
    ]  # fmt: skip
    assert rep.scalars["cast"] == str(dtype) and rep.scalars["dtype"] == "torch.float32"
    assert rep.scalars["writes_probs"] and rep.scalars["writes_keep"]
    fwd = next(gr for gr in backend.report.graphs if gr.name == "forward")
    for op in ("native_dropout", "inductor_random", "convert_element_type", "_to_copy"):
        assert op not in fwd.code, (op, fwd.code)
    assert backend.report.counts["fused_softmax_backward"] == 1, str(backend.report)
    assert y.dtype == dtype
    sr = s.detach().clone().requires_grad_()
    w = torch.softmax((sr + pos + m).float(), dim=-1).type_as(sr)
    keep = y.detach() != 0  # (no probability rounds to 0 here)
    assert 0.5 < keep.float().mean() < 0.95
    ref = torch.where(keep, w * (1 / (1 - P)), torch.zeros((), dtype=dtype))
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(s.grad, sr.grad, atol=tol, rtol=tol)


def test_dropout_after_an_absorbed_half_cast(poison):
    """MPT in half precision, inference: the fp32 bias promotes the scores, the cast back
    to half is absorbed into the softmax (stored as half); a dropout after it fuses too."""
    fill = torch.finfo(torch.float16).min

    def fn(x, bias, mk):
        z = (x * 0.125 + bias).masked_fill(mk, fill)
        return F.dropout(torch.softmax(z.float(), -1).to(torch.float16), p=P, training=True)

    x = torch.randn(2, 3, 7, 11, dtype=torch.float16)
    bias = torch.randn(3, 1, 11)  # fp32: the scores become fp32
    mk = torch.rand(2, 1, 7, 11) < 0.3
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with torch.no_grad(), _common.count_launches() as launches:
        y = torch.compile(fn, backend=backend)(x, bias, mk)
    assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1}, str(backend.report)
    (rep,) = [r for r in backend.report.graphs[0].replacements if r.pattern.endswith("dropout")]
    assert rep.scalars["dtype"] == "torch.float16" and "cast" not in rep.scalars
    w = torch.softmax((x * 0.125 + bias).masked_fill(mk, fill).float(), -1).half()
    keep = y != 0
    ref = torch.where(keep, w * (1 / (1 - P)), torch.zeros((), dtype=torch.float16))
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)


def test_manual_seed_repeats_the_draws():
    x, mask = torch.randn(2, 2, 5, 9), torch.zeros(1, 1, 5, 9)
    compiled, _ = _compile("eager")
    with torch.no_grad():
        torch.manual_seed(7)
        a = compiled(x, mask)
        b = compiled(x, mask)
        torch.manual_seed(7)
        c = compiled(x, mask)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)  # each call draws a new mask


def test_inference_writes_only_the_output(poison):
    x, mask = torch.randn(2, 2, 5, 9), torch.randn(2, 1, 5, 9)
    compiled, backend = _compile("eager")
    with torch.no_grad(), _common.count_launches() as launches:
        y = compiled(x, mask)
    assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1}
    (graph,) = backend.report.graphs
    (rep,) = [r for r in graph.replacements if r.pattern == "fused_softmax_dropout"]
    assert rep.scalars["writes_probs"] is False and rep.scalars["writes_keep"] is False
    keep = y != 0
    torch.testing.assert_close(y, torch.softmax(x * 0.125 + mask, -1) * keep / (1 - P))


def test_plain_softmax_dropout_fp16_and_explain_of_a_refused_p(poison):
    x = torch.randn(3, 17, dtype=torch.float16)
    compiled = torch.compile(
        lambda x: F.dropout(torch.softmax(x, -1), 0.5, True),
        backend=tilebackend.TileBackend(options={"fallback": "eager"}),
    )
    torch._dynamo.reset()
    with torch.no_grad():
        y = compiled(x)
    keep = y != 0
    torch.testing.assert_close(y, (torch.softmax(x.float(), -1) * keep * 2).half())
    # p = 1 drops everything: eager's own op, and explain() says why it was not fused
    torch._dynamo.reset()
    with torch.no_grad():
        report = tilebackend.explain(
            lambda x: F.dropout(torch.softmax(x, -1), 1.0, True),
            x,
            tile_options={"fallback": "eager"},
        )
    assert "fused_softmax_dropout" not in report.counts
    assert any("not in (0, 1)" in s.reason for s in report.skipped), str(report)


def test_dynamic_shapes_one_graph_no_guards(poison):
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(attention_probs, backend=backend, dynamic=True)
    for shape in [(2, 3, 5, 7), (3, 2, 6, 11)]:
        x = torch.randn(*shape, requires_grad=True)
        mask = torch.randn(shape[0], 1, shape[2], shape[3])
        with _common.count_launches() as launches:
            y = compiled(x, mask)
            y.sum().backward()
        assert dict(launches) == {"scale_mask_softmax_dropout_fwd": 1, "scale_mask_softmax_bwd": 1}
        keep = y.detach() != 0
        ref = torch.softmax(x.detach() * 0.125 + mask, -1) * keep / (1 - P)
        torch.testing.assert_close(y, ref)
    # one compile served both shapes, and no fusion decision added a guard
    assert len([g for g in backend.report.graphs if g.name == "forward"]) == 1
    assert all(not g.guards_added for g in backend.report.graphs)
    assert any(g.symbolic for g in backend.report.graphs)
