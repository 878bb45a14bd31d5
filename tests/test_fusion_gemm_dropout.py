"""Dropout after a GEMM (GPT-2's and BERT's residual dropouts in training) fused into the
GEMM's epilogue: the keep mask is ``rand(seed, flat index) > p`` in the kernel, written
with the output when the backward saves it; the numbers match eager given that mask."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import tilebackend
from tilebackend.codegen import _common, dropout, fused_matmul, fused_matmul_multi, pointwise

P = 0.25
SCALE = 1.0 / (1.0 - P)
OUT = ("mul", ("mul", "ACC", ("gt", ("rand", "IN0"), P)), SCALE)
KEEP = ("gt", ("rand", "IN0"), P)
tile = torch.ops.tile


def _multi(a, b, bias, seed, exprs=(OUT, KEEP)):
    return tile.mm_epilogue_multi(a, b, bias, [seed], [pointwise.dumps(e) for e in exprs])


def _seed(device, value=1234):
    return torch.tensor([value], dtype=torch.int64, device=device)


@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
)
def test_kernel_draws_the_standalone_ops_mask(poison, device, dtype, atol, rtol):
    """The epilogue's keep mask is the one ``tile::dropout_keep`` draws for that seed (the
    same Philox stream over the flat index), and the output is ``acc * keep / (1 - p)``."""
    a = torch.randn(3, 13, 17, device=device, dtype=dtype)
    b = torch.randn(17, 19, device=device, dtype=dtype)
    bias = torch.randn(19, device=device, dtype=dtype)
    with _common.count_launches() as launches:
        out, keep = _multi(a, b, bias, _seed(device))
        same = tile.dropout_keep(torch.empty(3, 13, 19, device=device), _seed(device), P)
    assert launches["mm_epilogue_multi"] == 1 and launches["dropout_keep"] == 1
    assert keep.dtype == torch.bool and keep.shape == (3, 13, 19)
    assert torch.equal(keep, same)
    acc = (a.float() @ b.float() + bias.float()).to(dtype)
    expect = torch.where(keep, acc.float() * SCALE, 0.0).to(dtype)
    torch.testing.assert_close(out, expect, atol=atol, rtol=rtol)
    # the single-output kernel (the mask not needed): the same draws
    with _common.count_launches() as launches:
        only = tile.mm_epilogue(a, b, bias, [_seed(device)], pointwise.dumps(OUT))
    assert launches["mm_epilogue"] == 1
    torch.testing.assert_close(only, out, atol=0, rtol=0)
    # about 1 - p kept; another seed, another mask
    assert 0.6 < keep.float().mean().item() < 0.9
    _, other = fused_matmul_multi.matmul_epilogue_multi(a, b, bias, [_seed(device, 7)], [OUT, KEEP])
    assert not torch.equal(other, keep)


def test_kernel_refuses_a_bad_seed(device):
    a, b = torch.randn(4, 5, device=device), torch.randn(5, 6, device=device)
    assert "int64" in fused_matmul.check(a, b, None, [torch.ones(1, device=device)], OUT)
    two = torch.tensor([1, 2], device=device)
    assert "one-element" in fused_matmul.check(a, b, None, [two], OUT)
    both = ("add", ("rand", "IN0"), "IN0")
    assert "both as a rand seed and as a value" in fused_matmul.check(
        a, b, None, [_seed(device)], both
    )
    # no element index in a printer call that does not give one
    with pytest.raises(pointwise.ExprError, match="index"):
        pointwise.print_triton(KEEP, {"IN0": "s"})
    with pytest.raises(pointwise.ExprError, match="shape"):
        pointwise.evaluate(KEEP, {"IN0": _seed(device)})


def test_reference_is_consistent_between_outputs(device):
    """The eager fallback draws one mask for every output of the op."""
    a, b = torch.randn(6, 5, device=device), torch.randn(5, 7, device=device)
    out, keep = fused_matmul_multi.reference(a, b, None, [_seed(device)], [OUT, KEEP])
    torch.testing.assert_close(out, torch.where(keep, (a @ b) * SCALE, 0.0))
    assert torch.equal(dropout.reference(out, _seed(device), P), keep)


class _Block(nn.Module):
    """``dropout(linear(x))``, as GPT-2's ``resid_dropout(c_proj(h))``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.drop = nn.Dropout(P)

    def forward(self, x):
        return self.drop(self.proj(x))


@pytest.mark.parametrize(
    "fallback, dtype, atol, rtol",
    [
        ("eager", torch.float32, 1e-5, 1e-5),
        ("inductor", torch.float32, 1e-5, 1e-5),
        ("eager", torch.float16, 2e-2, 2e-2),
        ("inductor", torch.float16, 2e-2, 2e-2),  # Inductor casts the random numbers first
    ],
)
def test_training_dropout_after_linear_is_one_kernel(poison, fallback, dtype, atol, rtol):
    model = _Block().train().to(dtype)
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        y = torch.compile(model, backend=backend)(x)
        g = torch.randn_like(y)
        y.backward(g)
    fwd = next(r for r in backend.report.graphs if r.name == "forward")
    assert fwd.counts.get("fused_mm_epilogue") == 1, str(backend.report)
    assert "native_dropout.default" not in fwd.code and "inductor_random" not in fwd.code
    assert launches["mm_epilogue_multi"] == 1, dict(launches)  # the output and its mask
    # eager's numbers given the kernel's mask (no element of linear(x) is exactly 0),
    # against an fp32 reference
    w, xf, gf = model.proj.weight.float(), x.detach().float(), g.float()
    lin = xf @ w.t() + model.proj.bias.float()
    keep = y.detach() != 0
    assert 0.55 < keep.float().mean().item() < 0.95
    close = dict(atol=atol, rtol=rtol)
    torch.testing.assert_close(y.detach().float(), torch.where(keep, lin * SCALE, 0.0), **close)
    gl = torch.where(keep, gf * SCALE, 0.0)
    torch.testing.assert_close(x.grad.float(), gl @ w, **close)
    wgrad = gl.reshape(-1, 24).t() @ xf.reshape(-1, 16)
    torch.testing.assert_close(model.proj.weight.grad.float(), wgrad, **close)
    torch.testing.assert_close(model.proj.bias.grad.float(), gl.sum((0, 1)), **close)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize("batched", [False, True], ids=["linear", "bmm"])
def test_training_dropout_after_an_activation_is_one_kernel(poison, fallback, batched):
    """``dropout(relu(x @ w)) + r`` in training: the ReLU's backward mask (a bool the
    backward saves, last in the forward graph with Inductor's partitioner) and the keep
    mask are two branches of the region, and the dropout's seed is drawn after the
    ReLU's saved output is read: one kernel writes the output, the ReLU's output or mask
    and the keep mask (before, the kernel stopped at the ReLU and the dropout ran as
    ATen ops)."""
    w = torch.randn(4, 16, 24) if batched else torch.randn(16, 24)
    w.requires_grad_(True)
    x = torch.randn(4, 7, 16, requires_grad=True)
    r = torch.randn(4, 7, 24)

    def fn(x, w, r):
        h = torch.bmm(x, w) if batched else x @ w
        return torch.nn.functional.dropout(torch.relu(h), P, training=True) + r

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        y = torch.compile(fn, backend=backend)(x, w, r)
        y.square().sum().backward()
    fwd = next(g for g in backend.report.graphs if g.name == "forward")
    assert "native_dropout.default" not in fwd.code and "inductor_random" not in fwd.code
    for op in ("aten.relu", "aten.mul.Tensor", "aten.add.Tensor", "aten.le.Scalar"):
        assert op not in fwd.code, (op, fwd.code)
    assert launches["mm_epilogue_multi"] == 1, dict(launches)
    # eager's numbers given the kernel's mask (kept where the output is not r)
    h = (torch.bmm(x, w) if batched else x @ w).detach()
    keep = (y.detach() - r) != 0
    assert 0.3 < keep.float().mean().item() < 0.6  # (ReLU zeros, then 1 - p of the rest)
    expect = torch.where(keep, torch.relu(h) * SCALE, 0.0) + r
    torch.testing.assert_close(y.detach(), expect, atol=1e-5, rtol=1e-5)
    g = torch.where(keep & (h > 0), 2 * y.detach() * SCALE, 0.0)
    gw = x.detach().transpose(-1, -2) @ g
    torch.testing.assert_close(x.grad, g @ w.detach().transpose(-1, -2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad, gw if batched else gw.sum(0), atol=1e-4, rtol=1e-4)


def test_manual_seed_repeats_and_calls_differ(poison):
    model = _Block().train()
    x = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    f = torch.compile(model, backend=tilebackend.TileBackend(options={"fallback": "eager"}))
    with _common.count_launches() as launches:
        torch.manual_seed(5)
        y1, y2 = f(x), f(x)
        torch.manual_seed(5)
        y3 = f(x)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)
    # each call drew its mask in the GEMM's epilogue (the mask saved: multi-output)
    assert launches["mm_epilogue_multi"] == 3 and launches["dropout_keep"] == 0, dict(launches)


def test_dropout_after_residual_add_and_before_layer_norm(poison):
    """GPT-2's block: ``ln(dropout(c_proj(h)) + residual)``: the GEMM writes the output and
    the mask; the add and the norm are the residual-norm kernel."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _Block()
            self.ln = nn.LayerNorm(24)

        def forward(self, x, r):
            return self.ln(self.block(x) + r)

    model = Res().train()
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with _common.count_launches() as launches:
        out = torch.compile(model, backend=backend)(x, r)
        out.sum().backward()
    counts = backend.report.counts
    assert counts["fused_mm_epilogue"] == 1 and counts["fused_add_layer_norm"] == 1
    assert launches["mm_epilogue_multi"] == 1 and launches["add_layer_norm_fwd"] == 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "fallback, dtype, op",
    [
        ("eager", torch.float32, "native_dropout"),
        ("inductor", torch.float32, "inductor_random"),
        ("inductor", torch.float16, "convert_element_type"),  # the cast put back too
    ],
)
def test_unfused_dropout_is_put_back(poison, fallback, dtype, op):
    """A dropout with no GEMM before it keeps its own ops (no extra launches)."""

    def f(x):
        return torch.nn.functional.dropout(x.relu(), P, training=True)

    x = torch.randn(4, 9, dtype=dtype, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        y = torch.compile(f, backend=backend)(x)
        y.float().sum().backward()
    assert launches["dropout_keep"] == 0
    fwd = next(r for r in backend.report.graphs if r.name == "forward")
    assert op in fwd.code and "dropout_keep" not in fwd.code
    keep = y.detach() != 0
    expect = torch.where(keep, x.detach().float().relu() * SCALE, 0.0)
    torch.testing.assert_close(y.detach().float(), expect, atol=1e-2, rtol=1e-2)
    assert torch.equal(x.grad != 0, keep & (x.detach() > 0))


def test_eval_mode_has_no_dropout(poison):
    model = _Block().eval()
    x = torch.randn(2, 3, 16)
    torch._dynamo.reset()
    with _common.count_launches() as launches:
        y = torch.compile(model, backend=tilebackend.TileBackend(options={"fallback": "eager"}))(x)
    torch.testing.assert_close(y, model.proj(x))
    assert dict(launches) == {"addmm": 1}, dict(launches)  # the tile GEMM, no dropout


def test_one_randint_draws_every_seed(poison):
    """Two fused dropouts (and a softmax's) draw their seeds in one ``randint`` launch,
    and ``torch.manual_seed`` still repeats the step."""
    l1, l2 = nn.Linear(16, 16), nn.Linear(16, 24)

    def f(x):
        h = torch.nn.functional.dropout(l1(x), P, training=True)
        s = torch.nn.functional.dropout(torch.softmax(h * 0.5, -1), P, training=True)
        return torch.nn.functional.dropout(l2(s), P, training=True)

    x = torch.randn(3, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(f, backend=backend)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        with _common.count_launches() as launches:
            outs.append(compiled(x))
    assert torch.equal(outs[0], outs[1])
    assert launches["mm_epilogue_multi"] == 2 and launches["scale_mask_softmax_dropout_fwd"] == 1
    fwd = next(r for r in backend.report.graphs if r.name == "forward")
    assert fwd.code.count("aten.randint") == 1, fwd.code


@pytest.mark.parametrize("case", ["epilogue_took_the_input", "two_in_a_row"])
def test_put_back_dropout_reads_the_current_input(poison, case):
    """A dropout put back reads its input as the graph has it then: the epilogue pass may
    have replaced that node (``mm + e`` fused, the dropout not), or a dropout before it
    was put back too.  A stale node made the whole graph's fusion fail."""
    if case == "epilogue_took_the_input":

        def f(x, w, e, r):
            y = r + torch.nn.functional.dropout(torch.mm(x, w) + e, 0.5, training=True)
            return y, torch.nn.functional.layer_norm(y, (16,))

        args = [torch.randn(13, 7), torch.randn(7, 16), torch.randn(13, 16), torch.randn(13, 16)]
    else:

        def f(x):
            return torch.nn.functional.dropout(torch.nn.functional.dropout(x, 0.5, True), 0.3, True)

        args = [torch.randn(6, 9)]
    args = [a.requires_grad_() for a in args]
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "fusing the ... graph failed"
        out = torch.compile(f, backend=backend)(*args)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in out).backward()
    assert not any("fusion failed" in n for g in backend.report.graphs for n in g.notes)
    if case == "epilogue_took_the_input":
        x, w, e, r = (a.detach() for a in args)
        d = out[0].detach() - r
        keep = d.abs() > 1e-6
        torch.testing.assert_close(d[keep], ((x @ w + e) * 2)[keep], atol=1e-5, rtol=1e-5)
        assert backend.report.counts.get("fused_mm_epilogue") == 1, str(backend.report)
    else:
        y, x = out[0].detach(), args[0].detach()
        keep = y != 0
        torch.testing.assert_close(y[keep], (x / 0.5 / 0.7)[keep])


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize("shape", [(11,), (5, 1), ()], ids=["row", "column", "0-dim"])
def test_dropout_of_a_broadcast_epilogue_input_keeps_its_shape(poison, fallback, shape):
    """``(g @ w) * dropout(b)`` with ``b`` broadcast over the output: the mask is one of
    ``b``'s shape, so whole columns (rows, everything) are kept or dropped together.  The
    dropout is not taken into the GEMM's kernel as a producer of its input, where its
    draws would be per output element (fuzz 15)."""
    w = torch.randn(7, 11)

    def fn(g, b):
        return (g @ w) * torch.nn.functional.dropout(b, 0.5, training=True)

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    g, b = torch.randn(5, 7), torch.rand(shape) + 1.0
    with torch.no_grad(), _common.count_launches() as launches:
        out = torch.compile(fn, backend=backend)(g, b)
    assert launches["mm_epilogue"] == 1, dict(launches)  # (the mask times the GEMM)
    keep = torch.broadcast_to((out / (g @ w)).abs() > 1e-3, (5, 11))
    if len(shape) == 1:
        assert torch.equal(keep, keep[:1].expand(5, 11)), keep
    elif len(shape) == 2:
        assert torch.equal(keep, keep[:, :1].expand(5, 11)), keep
    else:
        assert keep.all() or not keep.any(), keep
    torch.testing.assert_close(out, torch.where(keep, (g @ w) * b * 2.0, 0.0))
