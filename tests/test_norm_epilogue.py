"""``tile::norm_epilogue``: a layer / RMS norm and the pointwise ops after it (adaLN's
modulation, Gemma's ``1 + w``, casts) in one generated kernel, which also writes the
norm's statistics and any value of the region read elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_tile, grads_like_eager, inference_like_eager

from tilebackend.codegen import _common
from tilebackend.codegen import norm_epilogue as ne

MODULATE = '["add",["mul","ACC",["add",1.0,"IN0"]],"IN1"]'
MASKED = '["where","IN2",0.0,' + MODULATE + "]"
LEFTOVER = ("aten.mul.Tensor", "aten.native_layer_norm", "aten.rsqrt")


def _modulate(x, scale, shift):  # DiT's adaLN: per sample, broadcast over the tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --- the kernel ----------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)],
)
@pytest.mark.parametrize("shape", [(2, 5, 37), (3, 1, 8), (1, 7, 1), (0, 3, 16), (13,)])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_matches_the_unfused_ops(poison, rms, dtype, atol, rtol, shape, residual):
    """Two results (the modulated rows under a mask, and the normalised value itself),
    the sum with a residual (broadcast over the batch), and the statistics, against the
    unfused norm op and eager ops."""
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    w = torch.randn(n, dtype=dtype)
    b = None if rms else torch.randn(n, dtype=dtype)
    lead = (shape[0], 1) if len(shape) == 3 else ()
    scale, shift = torch.randn(*lead, n, dtype=dtype), torch.randn(*lead, n, dtype=dtype)
    mask = torch.rand(shape[-2:] if len(shape) > 1 else shape) > 0.5  # broadcast over dim 0
    res = torch.randn(shape[-2:] if len(shape) > 1 else shape, dtype=dtype) if residual else None
    eps = None if rms else 1e-5
    args = (x, res, [n], w, b, eps, rms, [scale, shift, mask], [MASKED, '"ACC"'])
    with _common.count_launches() as launches:
        got = torch.ops.tile.norm_epilogue(*args)
    ref = ne.reference(*args)
    assert len(got) == len(ref) == (3 if rms else 4) + residual
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g.to(r.dtype), r, atol=atol, rtol=rtol)
    assert dict(launches) == ({"norm_epilogue": 1} if x.numel() else {}), dict(launches)


def test_strided_rows_and_extras(poison):
    """A transposed input (rows not contiguous) and a strided per-row extra."""
    x = torch.randn(24, 3, 5).transpose(0, 2)  # [5, 3, 24], column stride 15
    scale = torch.randn(5, 48)[:, ::2].unsqueeze(1)  # [5, 1, 24], column stride 2
    args = (x, None, [24], None, None, 1e-6, False, [scale, scale], [MODULATE])
    with _common.count_launches() as launches:
        got = torch.ops.tile.norm_epilogue(*args)
    torch.testing.assert_close(got, ne.reference(*args))
    assert dict(launches) == {"norm_epilogue": 1}, dict(launches)


@pytest.mark.parametrize(
    "args, why",
    [
        ((torch.randn(2, 3, 4), [3, 4], None, None, 1e-5, False, [], ['"ACC"']), "2 dims"),
        (
            (torch.randn(2, ne.MAX_N + 1), [ne.MAX_N + 1], None, None, 1e-5, False, [], ['"ACC"']),
            "do not fit",
        ),
        (
            (torch.randn(2, 8), [8], None, None, 1e-5, False, [torch.randn(3, 8)], ['"IN0"']),
            "broadcast",
        ),
        ((torch.randn(2, 8).double(), [8], None, None, 1e-5, True, [], ['"ACC"']), "float64"),
        ((torch.randn(2, 8), [8], None, None, 1e-5, False, [], ['"IN1"']), "IN1"),
    ],
)
def test_check_names_the_reason(args, why):
    x, ns, w, b, _eps, rms, extras, exprs = args
    reason = ne.check(x, None, ns, w, b, rms, extras, exprs)
    assert reason is not None and why in reason, reason


# --- the fusion pass ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layer", "layer_affine", "rms"])
@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
)
def test_adaln_modulation_is_one_kernel(poison, norm, dtype, atol, rtol):
    n = 24
    ln = torch.nn.LayerNorm(n, elementwise_affine=norm == "layer_affine").to(dtype)
    rn = torch.nn.RMSNorm(n, eps=1e-6).to(dtype)
    f = rn if norm == "rms" else ln

    def fn(x, scale, shift):
        return _modulate(f(x), scale, shift)

    x, scale, shift = (torch.randn(s, dtype=dtype) for s in ((3, 7, n), (3, n), (3, n)))
    backend, launches = inference_like_eager(fn, x, scale, shift, atol=atol, rtol=rtol)
    assert dict(launches) == {"norm_epilogue": 1}, (dict(launches), str(backend.report))
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_norm_epilogue") == 1, str(graph)
    for op in LEFTOVER:
        assert op not in graph.code, (op, graph.code)
    assert graph.code.count("aten.add.Tensor") == 1, graph.code  # (1 + scale: [B, 1, N])


def test_gemma_rms_norm_one_plus_weight_and_cast(poison):
    """Gemma's RMS norm: fp32 math, ``* (1 + w)``, then back to the input dtype."""
    w = torch.randn(32) * 0.1

    def fn(x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + w.float())).type_as(x)

    x = torch.randn(2, 5, 32, dtype=torch.float16)
    backend, launches = inference_like_eager(fn, x, atol=2e-3, rtol=2e-3)
    assert dict(launches) == {"norm_epilogue": 1}, (dict(launches), str(backend.report))


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_adaln_modulation_in_training(poison, fallback):
    """The forward kernel also writes the normalised value the modulation's gradient
    reads and the statistics the norm's backward reads; gradients as eager's."""
    ln = torch.nn.LayerNorm(16)

    def fn(x, scale, shift):
        return _modulate(ln(x), scale, shift)

    x, scale, shift = (torch.randn(s, requires_grad=True) for s in ((2, 5, 16), (2, 16), (2, 16)))
    compiled, backend = compile_tile(fn, {"fallback": fallback})
    with _common.count_launches() as launches:
        compiled(x, scale, shift).square().sum().backward()
    grads_like_eager([x, scale, shift, ln.weight, ln.bias], lambda: fn(x, scale, shift), 1e-4, 1e-4)
    assert launches["norm_epilogue"] == 1 and launches["layer_norm_bwd"] == 1, dict(launches)
    assert "layer_norm_fwd" not in launches, dict(launches)


def test_norm_epilogue_with_dynamic_shapes(poison):
    """Symbolic batch and tokens: one compile, fused for both sizes."""
    ln = torch.nn.LayerNorm(16, elementwise_affine=False)

    def fn(x, scale, shift):
        return F.silu(_modulate(ln(x), scale, shift))

    compiled, backend = compile_tile(fn, dynamic=True)
    for b, t in ((2, 5), (3, 7)):
        x, scale, shift = torch.randn(b, t, 16), torch.randn(b, 16), torch.randn(b, 16)
        with torch.no_grad(), _common.count_launches() as launches:
            out = compiled(x, scale, shift)
        torch.testing.assert_close(out, fn(x, scale, shift), atol=1e-5, rtol=1e-5)
        assert dict(launches) == {"norm_epilogue": 1}, dict(launches)
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_norm_epilogue") == 1, str(graph)


def test_a_norm_over_two_dims_says_why(poison):
    ln = torch.nn.LayerNorm((4, 6))

    def fn(x):
        return ln(x) * 2.0

    compiled, backend = compile_tile(fn)
    x = torch.randn(3, 4, 6)
    with torch.no_grad(), _common.count_launches() as launches:
        out = compiled(x)
    torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
    assert dict(launches) == {"layer_norm_fwd": 1}, dict(launches)
    (note,) = [s for s in backend.report.skipped if "norm epilogue" in s.reason]
    assert "normalizes over 2 dims" in note.reason, note.reason


@pytest.mark.parametrize("rms", [False, True])
def test_symbolic_normalized_size(poison, rms):
    """``norm(x, x.shape[-1:])`` under ``dynamic=True``: the normalized size is a
    symbolic graph value (the check took it for an int and the whole graph's fusion
    failed, a GEMM epilogue beside it included)."""

    def fn(x, w, m):
        n = x.shape[-1:]
        y = F.rms_norm(x, n, w) if rms else F.layer_norm(x, n, w)
        return F.silu(y), F.gelu(m @ m)

    compiled, backend = compile_tile(fn, dynamic=True)
    for n in (16, 24):
        x, w, m = torch.randn(3, 5, n), torch.randn(n), torch.randn(6, 6)
        with torch.no_grad(), _common.count_launches() as launches:
            out = compiled(x, w, m)
        torch.testing.assert_close(out, fn(x, w, m), atol=1e-5, rtol=1e-5)
        assert dict(launches) == {"norm_epilogue": 1, "mm_epilogue": 1}, dict(launches)
    assert not [n for g in backend.report.graphs for n in g.notes if "failed" in n]


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_residual_norm_with_modulation_is_one_kernel(poison, norm):
    """DiT's later blocks, pre-norm models' activations: ``norm(x + r)`` then pointwise
    ops is one kernel that also writes the sum the next residual reads."""
    n = 24
    ln, rn = torch.nn.LayerNorm(n, elementwise_affine=False), torch.nn.RMSNorm(n, eps=1e-6)
    f = ln if norm == "layer" else rn

    def fn(x, r, scale, shift):
        h = x + r
        return F.silu(_modulate(f(h), scale, shift)), h * 2

    args = tuple(torch.randn(s) for s in ((3, 7, n), (3, 7, n), (3, n), (3, n)))
    backend, launches = inference_like_eager(fn, *args)
    assert dict(launches) == {"norm_epilogue": 1}, (dict(launches), str(backend.report))
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_norm_epilogue") == 1, str(graph)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_residual_norm_with_modulation_in_training(poison, fallback):
    ln = torch.nn.LayerNorm(16)

    def fn(x, r, scale, shift):
        return _modulate(ln(x + r), scale, shift)

    shapes = ((2, 5, 16), (2, 5, 16), (2, 16), (2, 16))
    args = [torch.randn(s, requires_grad=True) for s in shapes]
    compiled, backend = compile_tile(fn, {"fallback": fallback})
    with _common.count_launches() as launches:
        compiled(*args).square().sum().backward()
    grads_like_eager([*args, ln.weight, ln.bias], lambda: fn(*args), 1e-4, 1e-4)
    assert launches["norm_epilogue"] == 1 and launches["layer_norm_bwd"] == 1, dict(launches)


def test_a_copy_after_a_norm_is_dropped(poison):
    """An eval-mode dropout's clone after BERT's embedding norm is the identity: the norm
    keeps its own tuned kernel (no identity epilogue kernel)."""
    ln, drop = torch.nn.LayerNorm(16), torch.nn.Dropout(0.1).eval()

    def fn(x, r):
        return drop(ln(x + r))

    args = (torch.randn(2, 5, 16), torch.randn(1, 5, 16))
    backend, launches = inference_like_eager(fn, *args)
    assert dict(launches) == {"add_layer_norm_fwd": 1}, dict(launches)
    assert "aten.clone" not in backend.report.graphs[0].code
