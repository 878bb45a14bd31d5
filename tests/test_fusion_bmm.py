"""Batched GEMM epilogues: the pointwise ops after a ``bmm`` (or a 4-D ``matmul``, which
ATen runs as one) are generated into its kernel, as a 2-D GEMM's are.  The template's
batch is grid axis 1; extras are read through (batch, row) strides, so a mask broadcast
over heads or a per-expert bias costs no copy.  Before, the report said "epilogues are
generated into 2-D GEMMs only" and the epilogue ran as ATen ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_tile, inference_like_eager

from tilebackend import settings
from tilebackend.codegen import _common, fused_matmul, fused_matmul_multi
from tilebackend.codegen import pointwise as pw

LEFTOVER = ("aten.mul.Tensor", "aten.add.Tensor", "aten.relu", "aten.gelu", "aten.tanh")
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]

# a [*, M, K] (the dims before M fold to the batch), b [batch, K, N]
SHAPES = {
    "odd": ((3, 5, 7), (3, 7, 11)),
    "primes": ((4, 17, 13), (4, 13, 19)),
    "ones": ((1, 1, 1), (1, 1, 1)),
    "4d": ((2, 3, 5, 8), (6, 8, 6)),
}


def _extras(a_shape, n, dtype):
    """A residual tile, a per-batch row ([batch, 1, N]), a per-row column and a bool
    mask broadcast over the rows: every way an extra is read."""
    lead = a_shape[:-1]
    return [
        torch.randn(*lead, n, dtype=dtype),
        torch.randn(*lead[:-1], 1, n, dtype=dtype),
        torch.randn(lead[-1], 1, dtype=dtype),
        torch.rand(*lead[:-1], 1, n) > 0.5,
    ]


EXPR = (
    "where",
    "IN3",
    0.0,
    ("add", ("mul", ("gelu", ("add", "ACC", "IN1"), "tanh"), "IN2"), "IN0"),
)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_batched_epilogue_kernel_matches_eager(poison, shape, dtype, atol, rtol):
    a_shape, b_shape = SHAPES[shape]
    a, b = torch.randn(a_shape, dtype=dtype), torch.randn(b_shape, dtype=dtype)
    extras = _extras(a_shape, b_shape[-1], dtype)
    assert fused_matmul.check(a, b, None, extras, EXPR) is None
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm_epilogue(a, b, None, extras, pw.dumps(EXPR))
    assert dict(launches) == {"mm_epilogue": 1}
    assert out.shape == (*a_shape[:-1], b_shape[-1])
    ref = fused_matmul.reference(
        a.float(),
        b.float(),
        None,
        [e if e.dtype == torch.bool else e.float() for e in extras],
        EXPR,
    )
    torch.testing.assert_close(out.float(), ref, atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_batched_epilogue_reads_strided_operands(poison, dtype, atol, rtol):
    """A transposed ``b`` (``k.transpose(1, 2)``), a non-contiguous ``a`` and an extra
    that is a strided view: read through their strides."""
    a = torch.randn(7, 3, 5, dtype=dtype).transpose(0, 1)  # [3, 7, 5], not contiguous
    b = torch.randn(3, 11, 5, dtype=dtype).transpose(1, 2)  # [3, 5, 11]
    res = torch.randn(3, 11, 7, dtype=dtype).transpose(1, 2)
    expr = ("add", ("relu", "ACC"), "IN0")
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm_epilogue(a, b, None, [res], pw.dumps(expr))
    assert dict(launches) == {"mm_epilogue": 1}
    torch.testing.assert_close(out, torch.relu(torch.bmm(a, b)) + res, atol=atol, rtol=rtol)


def test_batched_multi_result_kernel(poison):
    """The open epilogue's template (several results) is batched too."""
    a, b = torch.randn(2, 3, 5, 8), torch.randn(6, 8, 6)
    m = torch.randn(2, 1, 5, 6)
    exprs = [("tanh", ("add", "ACC", "IN0")), "ACC", ("add", "ACC", "IN0")]
    with _common.count_launches() as launches:
        outs = torch.ops.tile.mm_epilogue_multi(a, b, None, [m], [pw.dumps(e) for e in exprs])
    assert dict(launches) == {"mm_epilogue_multi": 1}
    refs = fused_matmul_multi.reference(a, b, None, [m], exprs)
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_batched_empty_and_refused(poison):
    b = torch.randn(3, 7, 11)
    out = fused_matmul.matmul_epilogue(torch.randn(3, 0, 7), b, None, [], ("relu", "ACC"))
    assert out.shape == (3, 0, 11)
    out = fused_matmul.matmul_epilogue(torch.randn(0, 5, 7), b[:0], None, [], ("relu", "ACC"))
    assert out.shape == (0, 5, 11)
    a = torch.randn(2, 5, 7)
    assert "needs a [*, M, K] a of that batch" in fused_matmul.check(a, b, None, [], "ACC")
    bias = torch.randn(11)
    assert "takes no bias" in fused_matmul.check(torch.randn(3, 5, 7), b, bias, [], "ACC")


def _relu_scale_residual(a, b, r):
    return torch.relu(torch.bmm(a, b)) * 0.5 + r


def _scores_no_softmax(q, k, m):  # attention-like scores with a head-broadcast mask
    return torch.tanh(q @ k.transpose(-1, -2) * 0.125 + m)


def _experts_bias_gelu(x, w, bias):  # batched experts: a per-expert bias, GELU
    return F.gelu(torch.bmm(x, w) + bias[:, None, :], approximate="tanh")


GRAPHS = {
    "relu_scale_residual": (_relu_scale_residual, [(3, 5, 7), (3, 7, 11), (5, 11)]),
    "scores_4d": (_scores_no_softmax, [(2, 3, 5, 8), (2, 3, 6, 8), (2, 1, 5, 6)]),
    "experts": (_experts_bias_gelu, [(4, 6, 8), (4, 8, 10), (4, 10)]),
}


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_bmm_epilogue_is_one_kernel(poison, case, fallback):
    fn, shapes = GRAPHS[case]
    args = [torch.randn(s) for s in shapes]
    backend, launches = inference_like_eager(fn, *args, options={"fallback": fallback})
    assert dict(launches) == {"mm_epilogue": 1}, (dict(launches), str(backend.report))
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_bmm_epilogue") == 1, str(graph)
    for op in LEFTOVER:
        assert op not in graph.code, (op, graph.code)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize("case", ["scores_4d", "experts"])
def test_bmm_epilogue_in_training(poison, case, fallback):
    """Forward and backward match eager; the forward's epilogue is one kernel, which also
    writes the values its backward saves (the experts' GELU input)."""
    fn, shapes = GRAPHS[case]
    leaves = [torch.randn(s, requires_grad=True) for s in shapes]
    compiled, backend = compile_tile(fn, {"fallback": fallback})
    with _common.count_launches() as launches:
        out = compiled(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.detach().requires_grad_() for t in leaves]
    ref = fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    fused = launches["mm_epilogue"] + launches["mm_epilogue_multi"]
    assert fused == 1, dict(launches)
    (forward,) = [g for g in backend.report.graphs if g.name == "forward"]
    assert forward.counts.get("fused_bmm_epilogue") == 1, str(backend.report)
    for op in LEFTOVER:  # (the tanh the backward saves is written by the same kernel)
        assert op not in forward.code, (op, forward.code)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_bmm_epilogue_with_dynamic_shapes(poison, fallback):
    """Symbolic batch, heads and sizes: one compile serves both calls, fused each time
    (the training forward's saved 3-D GEMM result is viewed back through symbolic sizes)."""
    fn, _ = GRAPHS["scores_4d"]
    compiled, backend = compile_tile(fn, {"fallback": fallback}, dynamic=True)
    for b, h, t, s in ((2, 3, 5, 6), (3, 2, 7, 4)):
        q = torch.randn(b, h, t, 8, requires_grad=True)
        k = torch.randn(b, h, s, 8, requires_grad=True)
        m = torch.randn(b, 1, t, s)
        with _common.count_launches() as launches:
            out = compiled(q, k, m)
            gq, gk = torch.autograd.grad(out.sum(), [q, k])
        q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
        ref = fn(q2, k2, m)
        rq, rk = torch.autograd.grad(ref.sum(), [q2, k2])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((gq, gk), (rq, rk), atol=1e-5, rtol=1e-5)
        assert launches["mm_epilogue"] + launches["mm_epilogue_multi"] == 1, dict(launches)
    assert sum(g.name == "forward" for g in backend.report.graphs) == 1, str(backend.report)


def test_attention_scores_stay_with_the_softmax(poison):
    """A scale and a mask before a softmax are the softmax's prologue, not the bmm's
    epilogue (the softmax fusions run first)."""

    def fn(q, k, v, m):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125 + m, dim=-1) @ v

    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    m = torch.randn(2, 1, 5, 5)
    backend, launches = inference_like_eager(fn, q, k, v, m)
    assert launches["mm_epilogue"] == 0, dict(launches)
    assert launches["scale_mask_softmax_fwd"] == 1, dict(launches)


def test_bmm_output_with_its_batch_split_fuses(poison):
    """A 3-D bmm result viewed as 4-D, whose input is no view of a 4-D tensor (a
    gradient ``probs^T @ dy`` viewed as ``[B, H, T, D]``, then added to the incoming
    one): the kernel takes the input viewed with the batch split, no copy."""

    def fn(a, b, m):
        return torch.bmm(a.transpose(1, 2), b).view(2, 3, 5, 11) + m

    a, b, m = torch.randn(6, 7, 5), torch.randn(6, 7, 11), torch.randn(2, 3, 5, 11)
    backend, launches = inference_like_eager(fn, a, b, m)
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_bmm_epilogue") == 1, str(graph)


def test_bmm_output_viewed_across_rows_says_why(poison):
    """A view that folds the batch into the rows leaves no batched output: the
    epilogue stays ATen ops, and the report says why."""

    def fn(a, b, m):
        return torch.bmm(a, b).view(30, 11) * m

    a, b, m = torch.randn(6, 5, 7), torch.randn(6, 7, 11), torch.randn(30, 11)
    backend, launches = inference_like_eager(fn, a, b, m)
    assert dict(launches) == {"bmm": 1}, dict(launches)
    notes = [s.reason for s in backend.report.skipped if s.pattern == "fusion"]
    assert any("is not the batched GEMM's with its batch split" in r for r in notes), notes
    (graph,) = backend.report.graphs
    assert "aten.view.default(view" not in graph.code, graph.code  # (no view left behind)


def test_baddbmm_says_why_it_takes_no_epilogue(poison):
    def fn(c, a, b):
        return torch.relu(torch.baddbmm(c, a, b, alpha=0.5))

    c, a, b = torch.randn(3, 5, 11), torch.randn(3, 5, 7), torch.randn(3, 7, 11)
    backend, launches = inference_like_eager(fn, c, a, b)
    assert dict(launches) == {"baddbmm": 1}, dict(launches)  # (the GEMM is still ours)
    notes = [s.reason for s in backend.report.skipped if s.pattern == "fusion"]
    assert any("a baddbmm takes no epilogue" in r for r in notes), notes


def test_a_refused_split_batch_says_why(poison):
    """The input viewed with the batch split is made before the fused op's check; when
    the check refuses (a float64 extra), the report says why and the graph keeps no
    such view."""

    def fn(a, b, m):
        return torch.bmm(a.transpose(1, 2), b).view(2, 3, 5, 11) + m

    a, b = torch.randn(6, 7, 5), torch.randn(6, 7, 11)
    m = torch.randn(2, 3, 5, 11, dtype=torch.float64)
    backend, launches = inference_like_eager(fn, a, b, m)
    assert dict(launches) == {"bmm": 1}, dict(launches)
    notes = [s.reason for s in backend.report.skipped if s.pattern == "fusion"]
    assert any("float64" in r for r in notes), notes
    (graph,) = backend.report.graphs
    assert "[2, 3, 5, 7]" not in graph.code, graph.code


def test_a_tma_config_from_elsewhere_runs_batched(poison, monkeypatch):
    """A bmm's tuning key never holds a persistent TMA config (that main loop has no
    batch), but a foreign tuning file could: the launch then runs its pointer-loop
    twin over every batch, not the first batch's tiles only."""
    from tilebackend.codegen import autotune
    from tilebackend.codegen import matmul as _mm

    tma = _mm.tma_configs(torch.float16)[0]
    monkeypatch.setattr(autotune, "select", lambda *a, **k: tma)
    a, b = torch.randn(3, 5, 16, dtype=torch.float16), torch.randn(3, 16, 24, dtype=torch.float16)
    out = fused_matmul.matmul_epilogue(a, b, None, [], ("relu", "ACC"))
    torch.testing.assert_close(out, torch.relu(torch.bmm(a, b)), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_bf16_bmm_epilogue_on_gpu(device, poison):
    """bf16 (the interpreter's bf16 ``tl.dot`` is wrong, so only here): attention-sized
    scores with a head-broadcast mask and a tanh, against an fp32 reference."""
    bf16 = torch.bfloat16
    a = torch.randn(4, 12, 128, 64, device=device, dtype=bf16)
    b = torch.randn(48, 64, 96, device=device, dtype=bf16)
    m = torch.randn(4, 1, 128, 96, device=device, dtype=bf16)
    expr = ("tanh", ("add", ("mul", "ACC", 0.125), "IN0"))
    # (the heuristic config: the tuner may pick ATen's unfused ops, which counts no launch)
    off = settings.Settings(autotune="off", poison_outputs=True)
    with settings.use(off), _common.count_launches() as launches:
        out = torch.ops.tile.mm_epilogue(a, b, None, [m], pw.dumps(expr))
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    ref = fused_matmul.reference(a.float(), b.float(), None, [m.float()], expr)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_bmm_output_with_its_batch_split_and_read_as_is_fuses(poison):
    """The same, with the 3-D result also returned: one kernel writes both (the view
    back to 3-D is of its output; the report said the output was not a batch split)."""

    def fn(a, b, m):
        g = torch.bmm(a, b)
        return g, g.view(2, 3, 5, 11) + m

    a, b, m = torch.randn(6, 5, 7), torch.randn(6, 7, 11), torch.randn(2, 3, 5, 11)
    backend, launches = inference_like_eager(fn, a, b, m)
    assert dict(launches) == {"mm_epilogue_multi": 1}, dict(launches)


@pytest.mark.parametrize(
    "mask_shape",
    [(2, 1, 5, 6), (1, 3, 5, 6), (2, 3, 1, 6), (2, 1, 1, 1), (1, 1, 5, 1)],
    ids=["heads", "batch", "row_per_head", "per_sample", "column"],
)
def test_batched_extras_broadcast_over_batch_dims(poison, mask_shape):
    """An extra broadcast over some of the batch dims (attention's ``[B, 1, T, S]``
    mask) is read through two batch levels, in every mode; and a 5-D output whose outer
    batch dims do not fold is still right (a copy)."""
    a, b = torch.randn(2, 3, 5, 8), torch.randn(6, 8, 6)
    m = torch.randn(mask_shape)
    expr = ("add", ("mul", "ACC", 0.5), "IN0")
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm_epilogue(a, b, None, [m], pw.dumps(expr))
    assert dict(launches) == {"mm_epilogue": 1}
    ref = (a.reshape(6, 5, 8) @ b).view(2, 3, 5, 6) * 0.5 + m
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    a5, b5 = torch.randn(2, 2, 3, 5, 8), torch.randn(12, 8, 6)
    m5 = torch.randn(2, 1, 3, 5, 6)
    out = torch.ops.tile.mm_epilogue(a5, b5, None, [m5], pw.dumps(expr))
    ref = (a5.reshape(12, 5, 8) @ b5).view(2, 2, 3, 5, 6) * 0.5 + m5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
