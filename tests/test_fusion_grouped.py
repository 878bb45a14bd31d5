"""Grouped GEMMs: the plain GEMMs of one input (attention's query, key and value
linears) run as one ``tile::grouped_mm`` launch, forward and backward right."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_tile

from tilebackend.codegen import _common
from tilebackend.codegen import grouped_matmul as gm


class QKV(torch.nn.Module):
    """Attention's input projections over a normalized input (GQA: fewer key/value
    columns), then scores and their product with the values (batched GEMMs: the three
    results meet in no pointwise op, so no dual GEMM takes two of them)."""

    def __init__(self, d=24, q=24, kv=24, bias=True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.q = torch.nn.Linear(d, q, bias=bias)
        self.k = torch.nn.Linear(d, kv, bias=bias)
        self.v = torch.nn.Linear(d, kv, bias=bias)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        return (q[..., : k.shape[-1]] @ k.transpose(-1, -2)) @ v


@pytest.mark.parametrize(
    "q, kv, bias", [(24, 24, True), (40, 8, False), (17, 5, True)], ids=["mha", "gqa", "odd"]
)
@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_qkv_projections_are_one_launch(poison, q, kv, bias, fallback):
    torch.manual_seed(0)
    m = QKV(q=q, kv=kv, bias=bias)
    x = torch.randn(2, 7, 24)
    f, backend = compile_tile(m, {"fallback": fallback})
    with torch.no_grad(), _common.count_launches() as launches:
        out = f(x)
        ref = m(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    (graph,) = backend.report.graphs
    assert graph.counts.get("grouped_mm") == 1, str(graph)
    assert launches["grouped_mm"] == 1 and not launches["addmm"] and not launches["mm"]
    assert "tile.addmm" not in graph.code and "tile.mm." not in graph.code, graph.code


def test_more_gemms_than_a_launch_takes(poison):
    """Five linears of one input: one grouped launch of four, the fifth plain."""
    torch.manual_seed(0)
    lins = torch.nn.ModuleList(torch.nn.Linear(16, 8 + i) for i in range(5))
    x = torch.randn(6, 16)

    def fn(x):
        return [lin(x) for lin in lins]

    f, backend = compile_tile(fn)
    with torch.no_grad(), _common.count_launches() as launches:
        outs = f(x)
    for got, lin in zip(outs, lins):
        torch.testing.assert_close(got, lin(x), atol=1e-5, rtol=1e-5)
    assert launches["grouped_mm"] == 1 and launches["addmm"] == 1, dict(launches)
    (rep,) = [r for r in backend.report.graphs[0].replacements if r.pattern == "grouped_mm"]
    assert rep.scalars["groups"] == gm.MAX_GROUPS


def test_not_grouped_when_a_weight_depends_on_a_result(poison):
    """A second GEMM whose weight is computed from the first's result cannot run in the
    same launch; explain() says why."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(8, 16), torch.randn(8, 16)
    x = torch.randn(6, 16)

    def fn(x):
        y = x @ w1.t()
        return y, x @ (w2 * y.mean()).t()

    f, backend = compile_tile(fn)
    with torch.no_grad(), _common.count_launches() as launches:
        y, z = f(x)
    torch.testing.assert_close(z, x @ (w2 * (x @ w1.t()).mean()).t(), atol=1e-5, rtol=1e-5)
    assert not launches["grouped_mm"] and launches["mm"] == 2, dict(launches)
    assert any("not grouped" in s.reason for s in backend.report.skipped), backend.explain()


@pytest.mark.parametrize("draws", [False, True], ids=["moves", "random"])
def test_group_runs_at_its_last_gemm_when_a_weight_comes_late(poison, draws):
    """The second weight is computed after the first GEMM (no view to hoist): the group
    runs where the second GEMM is, and the first result's reader moves after it.  A
    reader that draws random numbers cannot move (the draws would be reordered): then
    the GEMMs stay apart and explain() names the op."""
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(7, 5), torch.randn(5, 3), torch.randn(5, 4)

    def fn(x, w1, w2):
        y = (x @ w1).sum(0)
        return (torch.bernoulli(y.sigmoid()) if draws else y), x @ (w2 * 2)

    f, backend = compile_tile(fn)
    with torch.no_grad(), _common.count_launches() as launches:
        y, z = f(x, w1, w2)
    torch.testing.assert_close(z, x @ (w2 * 2), atol=1e-5, rtol=1e-5)
    if not draws:
        torch.testing.assert_close(y, (x @ w1).sum(0), atol=1e-5, rtol=1e-5)
        assert launches["grouped_mm"] == 1 and not launches["mm"], dict(launches)
        return
    assert not launches["grouped_mm"] and launches["mm"] == 2, dict(launches)
    why = [s.reason for s in backend.report.skipped if "not grouped" in s.reason]
    assert why and "bernoulli" in why[0] and "cannot move" in why[0], backend.explain()


def test_groups_of_a_grouped_result(poison):
    """Two GEMMs read a result of an earlier group: both groups run (the second used to
    read the replaced result: fusion failed, with a warning)."""
    import warnings

    torch.manual_seed(0)
    x, w1, w2 = torch.randn(5, 16), torch.randn(16, 8), torch.randn(16, 8)
    w3, w4 = torch.randn(8, 4), torch.randn(8, 6)

    def fn(x):
        h = x @ w1
        return h @ w3, h @ w4, x @ w2

    f, backend = compile_tile(fn)
    with torch.no_grad(), warnings.catch_warnings(), _common.count_launches() as launches:
        warnings.simplefilter("error", RuntimeWarning)  # (ours; not numpy's)
        outs = f(x)
    for o, r in zip(outs, fn(x), strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    assert dict(launches) == {"grouped_mm": 2}, dict(launches)


def test_merged_views_stop_at_a_mutation():
    """Duplicate views of one value become one node, but never across a mutation of
    what they view, and not when the graph returns them (they stay two tensors)."""
    from tilebackend.fx_passes.cse import merge_views

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    v = [g.call_function(aten.view.default, (x, [6])) for _ in range(2)]
    g.call_function(aten.copy_.default, (x, y))
    w = [g.call_function(aten.view.default, (x, [6])) for _ in range(2)]
    t = [g.call_function(aten.t.default, (y,)), g.call_function(aten.t.default, (x,))]
    used = [g.call_function(aten.neg.default, (n,)) for n in (*v, *w, *t)]
    returned = [g.call_function(aten.view.default, (y, [6])) for _ in range(2)]
    g.output((*used, *returned))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert merge_views(gm) == 2
    read = [n.args[0] for n in used]
    assert read[0] is read[1] and read[2] is read[3] and read[1] is not read[2]
    assert read[4] is not read[5]
    out = next(iter(n for n in gm.graph.nodes if n.op == "output")).args[0]
    assert out[-1] is not out[-2]


def test_other_inputs_are_not_grouped_and_mixed_biases_are(poison):
    """Linears of one input group whether they have a bias or not (Whisper's key
    projection has none); a linear of another input stays apart."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8, bias=False)
    c = torch.nn.Linear(12, 8)
    x, y = torch.randn(6, 16), torch.randn(6, 12)

    def fn(x, y):
        return a(x), b(x), c(y)

    f, backend = compile_tile(fn)
    with torch.no_grad(), _common.count_launches() as launches:
        out = f(x, y)
    for got, ref in zip(out, fn(x, y)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert launches["grouped_mm"] == 1, dict(launches)
    (rep,) = [r for r in backend.report.graphs[0].replacements if r.pattern == "grouped_mm"]
    assert rep.targets == ["tile.addmm", "tile.mm"]


def test_dynamic_tokens(poison):
    """dynamic=True: one graph, grouped, right for each token count (no specialising;
    Dynamo itself specialises sizes 0 and 1)."""
    torch.manual_seed(0)
    m = QKV(q=24, kv=8)
    f, backend = compile_tile(m, dynamic=True)
    with torch.no_grad():
        for t in (3, 11, 6):
            x = torch.randn(2, t, 24)
            with _common.count_launches() as launches:
                out = f(x)
            torch.testing.assert_close(out, m(x), atol=1e-4, rtol=1e-4)
            assert launches["grouped_mm"] == 1
    assert len(backend.report.graphs) == 1


@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-2, 1e-2)]
)
def test_grouped_kernel_shapes(poison, device, dtype, atol, rtol):
    """The op: odd and size-1 widths, transposed and row-major weights, zero rows."""
    torch.manual_seed(0)
    a = torch.randn(37, 24, device=device).to(dtype)
    ws = [torch.randn(n, 24, device=device).to(dtype) for n in (33, 1, 16)]
    bs = [ws[0].t(), ws[1].t(), ws[2].t().contiguous()]
    cs = [torch.randn(w.shape[0], device=device).to(dtype) for w in ws]
    for biases in (cs, [None] * 3, [cs[0], None, cs[2]]):
        with _common.count_launches() as launches:
            outs = torch.ops.tile.grouped_mm(a, bs, biases)
        assert launches["grouped_mm"] == 1
        refs = gm.reference(
            a.double(), [b.double() for b in bs], [c if c is None else c.double() for c in biases]
        )
        for o, r in zip(outs, refs):
            assert o.is_contiguous() and o.dtype == dtype
            torch.testing.assert_close(o.double(), r, atol=atol, rtol=rtol)
    empty = torch.ops.tile.grouped_mm(a[:0], bs, cs)
    assert [tuple(o.shape) for o in empty] == [(0, 33), (0, 1), (0, 16)]


def test_grouped_op_refuses_bad_inputs(device):
    a = torch.randn(5, 8, device=device)
    b = torch.randn(8, 4, device=device)
    assert "2 to 4" in gm.check(a, [b], [None])
    assert "one each" in gm.check(a, [b, b], [torch.randn(4, device=device)])
    assert "inner sizes" in gm.check(a, [b, torch.randn(7, 4, device=device)], [None, None])
    assert "mixed dtypes" in gm.check(a, [b, b.half()], [None, None])
    assert "is not [4]" in gm.check(a, [b, b], [None, torch.randn(5, device=device)])
    # refused inputs (K == 0) still give the right numbers (ATen)
    a0, b0 = torch.randn(5, 0, device=device), torch.randn(0, 4, device=device)
    ones = torch.ones(4, device=device)
    assert gm.check(a0, [b0, b0], [ones, ones]) == "K == 0"
    with _common.count_launches() as launches:
        outs = torch.ops.tile.grouped_mm(a0, [b0, b0], [ones, ones])
    assert not launches["grouped_mm"]
    torch.testing.assert_close(outs[1], torch.ones(5, 4, device=device))


@pytest.mark.gpu
def test_grouped_gemm_on_the_gpu_is_not_slower_than_cublas(device):
    """bf16, the Llama row's GQA projections: after its quick search the grouped call is
    right and within noise of cuBLAS's three GEMMs (a timed baseline of its search)."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    import triton

    m, k = 4096, 2048
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for n in (2048, 256, 256)]
    bs = [w.t() for w in ws]
    outs = torch.ops.tile.grouped_mm(x, bs, [None] * 3)  # tunes
    for o, w in zip(outs, ws):
        torch.testing.assert_close(o.float(), x.float() @ w.float().t(), atol=5e-2, rtol=2e-2)
    grouped = triton.testing.do_bench(lambda: torch.ops.tile.grouped_mm(x, bs, [None] * 3))
    cublas = triton.testing.do_bench(lambda: [torch.mm(x, b) for b in bs])
    print(f"grouped {grouped * 1e3:.1f} us, cuBLAS x3 {cublas * 1e3:.1f} us")
    assert grouped <= 1.1 * cublas
