"""Sums of GEMMs: ``x @ W1 + y @ W2 + ...`` (a backward's gradient of an input several
linears read) run as one ``tile::mm_sum_epilogue`` launch, with no intermediate."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_tile, grads_like_eager
from test_fusion_grouped import QKV

from tilebackend.codegen import _common
from tilebackend.codegen import fused_matmul_sum as fms
from tilebackend.fx_passes.fusion_sum import absorb, renumber


def test_absorb_and_renumber():
    chain = ("add", ("add", "ACC", "IN0"), "IN2")
    assert absorb(chain, {0, 1, 2}, 3) == ("ACC", [0, 2])
    assert absorb(("relu", ("add", "IN1", "ACC")), {1}, 3) == (("relu", "ACC"), [1])
    scaled = ("add", "ACC", ("mul", "IN0", 2.0))  # not added straight to ACC
    assert absorb(scaled, {0}, 3) == (scaled, [])
    twice = ("add", ("add", "ACC", "IN0"), ("mul", "IN0", "IN0"))  # IN0 read elsewhere too
    assert absorb(twice, {0}, 3)[1] == []
    assert absorb(chain, {0, 2}, 1) == (("add", "ACC", "IN2"), [0])  # the limit
    assert absorb(chain, {2}, 3) == (("add", ("add", "ACC", "IN0"), "IN2"), [])  # inner first
    assert renumber(("where", "IN3", "ACC", "IN1"), {1: 0, 3: 1}) == ("where", "IN1", "ACC", "IN0")


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_sum_of_three_gemms_is_one_launch(poison, fallback):
    torch.manual_seed(0)
    x, y, z = torch.randn(9, 16), torch.randn(9, 5), torch.randn(9, 24)
    w1, w2, w3 = torch.randn(16, 12), torch.randn(5, 12), torch.randn(12, 24).t()

    def fn(x, y, z):
        return torch.relu(x @ w1 + y @ w2 + z @ w3) * 2

    f, backend = compile_tile(fn, {"fallback": fallback})
    with torch.no_grad(), _common.count_launches() as launches:
        out = f(x, y, z)
    torch.testing.assert_close(out, fn(x, y, z), atol=1e-4, rtol=1e-4)
    assert dict(launches) == {"mm_sum_epilogue": 1}, dict(launches)
    (rep,) = [
        r
        for g in backend.report.graphs
        for r in g.replacements
        if r.pattern.endswith("sum_epilogue")
    ]
    assert rep.scalars["terms"] == 2


def test_a_gemm_used_elsewhere_stays_an_extra(poison):
    torch.manual_seed(0)
    x, y = torch.randn(9, 16), torch.randn(9, 5)
    w1, w2 = torch.randn(16, 12), torch.randn(5, 12)

    def fn(x, y):
        p = y @ w2
        return x @ w1 + p, p.sum()

    f, _ = compile_tile(fn)
    with torch.no_grad(), _common.count_launches() as launches:
        out, s = f(x, y)
    torch.testing.assert_close(out, fn(x, y)[0], atol=1e-4, rtol=1e-4)
    assert not launches["mm_sum_epilogue"], dict(launches)


def test_qkv_training_is_grouped_forward_and_summed_backward(poison):
    """Training attention's projections: the forward's three are one grouped launch; in
    the backward, the gradient of the normalized input, ``dq @ Wq + dk @ Wk + dv @ Wv``,
    is one launch and the weights' gradients (``x^T @ dq``, ``x^T @ dk``, ``x^T @ dv``:
    one saved ``x``, its views merged before autograd) another; every gradient matches
    eager."""
    torch.manual_seed(0)
    m = QKV(q=40, kv=8)
    x = torch.randn(3, 5, 24, requires_grad=True)
    f, backend = compile_tile(m)
    with _common.count_launches() as launches:
        f(x).square().sum().backward()
    grouped = {g.name: g.counts.get("grouped_mm", 0) for g in backend.report.graphs}
    assert grouped == {"forward, before autograd": 0, "forward": 1, "backward": 1}, grouped
    assert launches["grouped_mm"] == 2, dict(launches)
    (bwd_group,) = [r for r in backend.report.graphs[-1].replacements if r.pattern == "grouped_mm"]
    assert bwd_group.scalars["groups"] == 3, bwd_group
    assert launches["mm_sum_epilogue"] == 1, dict(launches)
    bwd = [g for g in backend.report.graphs if g.name == "backward"]
    assert bwd and bwd[0].counts.get("fused_mm_sum_epilogue") == 1, str(bwd)
    grads_like_eager([x, *m.parameters()], lambda: m(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 3e-2, 1e-2)]
)
def test_sum_kernel(poison, device, dtype, atol, rtol):
    """The op: terms of their own K and layouts (a transposed A, a W.t() B), a bias, an
    extra, N-d rows."""
    torch.manual_seed(0)
    a = torch.randn(3, 7, 20, device=device).to(dtype)
    b = torch.randn(11, 20, device=device).to(dtype).t()
    bias = torch.randn(11, device=device).to(dtype)
    tas = [
        torch.randn(8, 21, device=device).to(dtype).t(),
        torch.randn(21, 3, device=device).to(dtype),
    ]
    tbs = [
        torch.randn(8, 11, device=device).to(dtype),
        torch.randn(11, 3, device=device).to(dtype).t(),
    ]
    r = torch.randn(3, 7, 11, device=device).to(dtype)
    expr = '["mul",["add","ACC","IN0"],0.5]'
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm_sum_epilogue(a, b, bias, tas, tbs, [r], expr)
    assert launches["mm_sum_epilogue"] == 1
    ref = fms.reference(
        a.double(), b.double(), bias.double(), [t.double() for t in tas],
        [t.double() for t in tbs], [r.double()], expr,
    )  # fmt: skip
    assert out.shape == (3, 7, 11) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_sum_op_refuses_bad_terms(device):
    a, b = torch.randn(6, 4, device=device), torch.randn(4, 5, device=device)
    ta, tb = torch.randn(6, 3, device=device), torch.randn(3, 5, device=device)
    expr = '"ACC"'
    assert fms.check(a, b, None, [ta], [tb], [], expr) is None
    assert "1 to 3" in fms.check(a, b, None, [], [], [], expr)
    assert "not the output's" in fms.check(a, b, None, [ta[:5]], [tb], [], expr)
    assert "expects A" in fms.check(a, b, None, [ta], [tb[:2]], [], expr)
    assert "float16" in fms.check(a, b, None, [ta.half()], [tb.half()], [], expr)
    # a refused call still gives the right numbers (eager)
    out = torch.ops.tile.mm_sum_epilogue(a, b, None, [ta[:, :0]], [tb[:0]], [], expr)
    torch.testing.assert_close(out, a @ b)


def test_dynamic_rows_do_not_specialise(poison):
    """dynamic=True: the terms' row counts are proven equal to the output's without a
    guard: one graph serves every row count."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(16, 12), torch.randn(5, 12)

    def fn(x, y):
        return torch.tanh(x @ w1 + y @ w2)

    f, backend = compile_tile(fn, dynamic=True)
    with torch.no_grad():
        for m in (9, 4, 13):
            x, y = torch.randn(m, 16), torch.randn(m, 5)
            with _common.count_launches() as launches:
                out = f(x, y)
            torch.testing.assert_close(out, fn(x, y), atol=1e-4, rtol=1e-4)
            assert dict(launches) == {"mm_sum_epilogue": 1}, dict(launches)
    assert len(backend.report.graphs) == 1


def test_sum_op_gradients_direct_call(device):
    """Called directly under autograd, the op's gradients (recomputed with eager ops)
    reach every input, each term's A and B included, and match eager's."""
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    a, b, bias = leaf(6, 4), leaf(4, 5), leaf(5)
    tas, tbs, r = [leaf(6, 3), leaf(6, 2)], [leaf(3, 5), leaf(2, 5)], leaf(6, 5)
    expr = '["mul",["add","ACC","IN0"],["add","ACC","IN0"]]'
    leaves = [a, b, bias, *tas, *tbs, r]
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm_sum_epilogue(a, b, bias, tas, tbs, [r], expr)
    assert launches["mm_sum_epilogue"] == 1
    got = torch.autograd.grad(out.sum(), leaves)
    ref = fms.reference(a, b, bias, tas, tbs, [r], expr)
    want = torch.autograd.grad(ref.sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
