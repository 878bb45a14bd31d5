"""Symbolic shapes: sympy proofs and refusals, and one compile serving every size."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.fx.experimental._config as fx_config
from helpers import grads_like_eager
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import tilebackend
from tilebackend.codegen import _common
from tilebackend.fx_passes import shapes


@pytest.fixture
def env():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    shape_env = ShapeEnv()
    s0, s1 = (
        shape_env.create_symintnode(
            shape_env.create_symbol(v, ConstantSource(f"n{v}"), DimDynamic.DYNAMIC), hint=v
        )
        for v in (7, 5)
    )
    return shape_env, s0, s1


def test_proofs_and_refusals(env):
    shape_env, s0, s1 = env
    f = shapes.Facts(shape_env)
    assert f.prove_eq(s0 * s1, s1 * s0) is True
    assert f.prove_eq(s0 + 1, s0) is False
    assert f.prove_eq(s0, s1) is None  # unknown: a run-time choice, never a guard
    assert f.prove_divisible(16 * s0, 16) is True
    assert f.prove_divisible(16 * s0 + 3, 16) is False
    assert f.prove_divisible(s0, 16) is None
    assert f.prove_static(768) and not f.prove_static(s0)
    assert f.prove_le(s0, s0 * 2) is True  # sizes are >= 0 (in fact >= 2 here)
    assert f.prove_le(s0 * s1 + 1, s0 * s1) is False
    assert f.prove_contiguous([s0, s1, 8], [8 * s1, 8, 1]) is True
    assert f.prove_contiguous([s0, 8], [1, s0]) is False
    assert f.prove_contiguous([s0, 8], [s1, 1]) is None
    assert f.prove_broadcastable([s0, 1, 8], [s1, 8]) is True
    assert f.prove_broadcastable([s0, 8], [s0, 9]) is False
    assert f.prove_broadcastable([s0], [s1]) is None
    assert shape_env.guards == []  # no proof or refusal added a guard


def test_hinted_checks_see_ints_without_guards(env):
    shape_env, s0, s1 = env
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(shape_env=shape_env):
        x = torch.empty(s0, s1, 16)
    h = shapes.hinted(x)
    assert isinstance(h, shapes.HintTensor)
    assert tuple(h.shape) == (7, 5, 16) and h.stride() == (80, 16, 1)
    assert h.is_contiguous() and h.numel() == 560 and h.dim() == 3
    proven, runtime = shapes.describe({"x": x}, shapes.Facts(shape_env))
    assert "x: inner size 16 is static" in proven and "x: contiguous" in proven
    assert shape_env.guards == []
    assert isinstance(shapes.hinted(s0 * 2), int)
    assert sympy.Integer(14) == shapes.hint(s0 * 2)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 24)

    def forward(self, x):
        return torch.log_softmax(self.fc(self.ln(x)), dim=-1)


SIZES = [(3, 5), (1, 1), (2, 7), (1, 13), (5, 3), (11, 2)]


def test_one_graph_for_every_size_including_1_and_primes(poison):
    torch._dynamo.reset()
    net = Net().eval()
    counters = torch._dynamo.utils.counters
    counters.clear()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(net, backend=backend, dynamic=True)
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        for b, t in SIZES:
            x = torch.randn(b, t, 16)
            with _common.count_launches() as launches:
                torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
            assert launches["layer_norm_fwd"] == 1 and launches["addmm"] == 1, (b, t)
            assert launches["log_softmax_fwd"] == 1
    assert counters["stats"]["unique_graphs"] == 1
    (graph,) = backend.report.graphs
    assert graph.symbolic and graph.guards_added == []
    assert "symbolic" in str(backend.report) and "added by tilebackend: none" in str(backend.report)


def test_automatic_dynamic_recompiles_at_most_once(poison):
    torch._dynamo.reset()
    net = Net().eval()
    counters = torch._dynamo.utils.counters
    counters.clear()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(net, backend=backend)
    with torch.no_grad():
        for b, t in [(2, 3), (3, 5), (4, 7), (5, 11), (6, 2)]:
            x = torch.randn(b, t, 16)
            with _common.count_launches() as launches:
                torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
            assert launches["layer_norm_fwd"] == 1
    assert counters["stats"]["unique_graphs"] <= 2
    assert backend.report.graphs[-1].symbolic


def test_fusion_adds_no_guards_under_dynamic_shapes(poison):
    """The fused regions are found on symbolic shapes without a single guard."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 16)
    ln = torch.nn.LayerNorm(16)

    def fn(x, m):
        h = torch.nn.functional.gelu(lin(x), approximate="tanh")
        a = torch.softmax(h @ h.transpose(-1, -2) * 0.25 + m, dim=-1)
        return ln(x + a @ h)

    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(fn, backend=backend, dynamic=True)
    with torch.no_grad():
        for b, t in [(2, 3), (3, 5), (4, 7)]:
            x, m = torch.randn(b, t, 16), torch.randn(b, 1, t, t)[:, 0]
            with _common.count_launches() as launches:
                torch.testing.assert_close(compiled(x, m), fn(x, m), atol=1e-4, rtol=1e-4)
            assert launches["mm_epilogue"] == 1 and launches["add_layer_norm_fwd"] == 1
            assert launches["scale_mask_softmax_fwd"] == 1
    (graph,) = backend.report.graphs
    assert graph.symbolic and graph.guards_added == [], str(backend.report)


# --- RMS norm written out, over a symbolic hidden size ----------------------------------


def _rms_plain(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rms_llama(x, w):
    """HF's LlamaRMSNorm: fp32 math, cast back, then the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(x.dtype)


def _rms_noweight(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def _rms_functional(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6)


#: form -> (function of (x, w), the pattern that takes it, whether it reads w)
RMS_FORMS = {
    "plain": (_rms_plain, "rms_norm_written", True),
    "llama": (_rms_llama, "rms_norm_llama", True),
    "noweight": (_rms_noweight, "rms_norm_written_noweight", False),
    "functional": (_rms_functional, "rms_norm", True),
}
#: (batch, rows, hidden): two odd hidden sizes, the rows varying too (no size 1:
#: Dynamo specialises a 1 and recompiles, whatever the backend)
RMS_SIZES = [(2, 3, 7), (3, 5, 13), (4, 2, 7)]


def _compile_dynamic(fn):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    return torch.compile(fn, backend=backend, dynamic=True), backend


def _one_compile(backend, names):
    """One Dynamo graph served every size (a guard pinning the hidden size, say
    ``Eq(s1, 7)``, would fail on 13 and recompile), and the rewrite added no guard."""
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, str(backend.report)
    assert [g.name for g in backend.report.graphs] == names, str(backend.report)
    assert all(g.symbolic and g.guards_added == [] for g in backend.report.graphs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("form", list(RMS_FORMS))
def test_written_out_rms_norm_over_a_symbolic_hidden_size(poison, form, dtype):
    """``dynamic=True`` makes the hidden size symbolic: the written-out RMS norm still
    becomes ``tile::rms_norm``, its normalized shape read from the graph's sizes, and
    one compile serves hidden sizes 7 and 13."""
    fn, pattern, _ = RMS_FORMS[form]
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (eager's fp16 math vs the fp32 kernel)
    compiled, backend = _compile_dynamic(fn)
    with torch.no_grad():
        for b, t, h in RMS_SIZES:
            x, w = torch.randn(b, t, h, dtype=dtype), torch.randn(h, dtype=dtype)
            with _common.count_launches() as launches:
                torch.testing.assert_close(compiled(x, w), fn(x, w), atol=tol, rtol=tol)
            assert launches["rms_norm_fwd"] == 1, ((b, t, h), dict(launches))
    _one_compile(backend, ["inference"])
    assert backend.report.counts.get(pattern) == 1, str(backend.report)


@pytest.mark.parametrize("form", ["plain", "llama", "noweight"])
def test_written_out_rms_norm_training_over_a_symbolic_hidden_size(poison, form):
    """Training: the pre-autograd rewrite keeps the normalized shape symbolic, so the
    tile op's backward serves every hidden size too; gradients match eager."""
    fn, pattern, weighted = RMS_FORMS[form]
    compiled, backend = _compile_dynamic(fn)
    for b, t, h in RMS_SIZES:
        x = torch.randn(b, t, h, requires_grad=True)
        w = torch.randn(h, requires_grad=True)
        with _common.count_launches() as launches:
            out = compiled(x, w)
            out.square().sum().backward()
        leaves = [x, w] if weighted else [x]
        ref = grads_like_eager(leaves, lambda x=x, w=w: fn(x, w), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert launches["rms_norm_fwd"] == 1 and launches["rms_norm_bwd"] == 1, dict(launches)
    _one_compile(backend, ["forward, before autograd", "forward", "backward"])
    assert backend.report.graphs[0].counts == {pattern: 1}, str(backend.report)


def test_residual_rms_norm_over_a_symbolic_hidden_size_fuses(poison):
    """The symbolic normalized size is read from the graph's inputs, not from the
    matched sum: the residual add still fuses into the norm (``tile::add_rms_norm``)."""
    compiled, backend = _compile_dynamic(lambda x, r, w: _rms_plain(x + r, w))
    with torch.no_grad():
        for b, t, h in RMS_SIZES:
            x, r, w = torch.randn(b, t, h), torch.randn(b, t, h), torch.randn(h)
            with _common.count_launches() as launches:
                got = compiled(x, r, w)
            torch.testing.assert_close(got, _rms_plain(x + r, w), atol=1e-5, rtol=1e-5)
            assert dict(launches) == {"add_rms_norm_fwd": 1}, dict(launches)
    _one_compile(backend, ["inference"])
    assert backend.report.counts.get("fused_add_rms_norm") == 1, str(backend.report)


def test_training_baddbmm_with_a_broadcast_bias_under_dynamic_shapes(poison):
    """The pre-autograd rewrite propagates fake values through ``baddbmm``, whose meta
    function expands the ``[N]`` bias to symbolic sizes: that needs the Python
    dispatcher (without it the rewrite failed with "SymIntArrayRef expected to contain
    only concrete integers" and the graph ran without tile kernels)."""
    import warnings

    torch.manual_seed(0)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager", "compile_cache": False})
    f = torch.compile(torch.baddbmm, backend=backend, dynamic=True)
    bias = torch.randn(16, requires_grad=True)
    for batch in (3, 5):
        bias.grad = None
        a = torch.randn(batch, 7, 8, requires_grad=True)
        b = torch.randn(batch, 16, 8).transpose(-1, -2).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (ours; not numpy's)
            with _common.count_launches() as launches:
                f(bias, a, b).square().sum().backward()
        assert launches["baddbmm"] == 1 and launches["bmm"] == 2, dict(launches)
        grads_like_eager([bias, a, b], lambda a=a, b=b: torch.baddbmm(bias, a, b), 1e-4, 1e-4)
    pre = [g for g in backend.report.graphs if g.name == "forward, before autograd"]
    assert pre and pre[0].counts.get("baddbmm") == 1, str(backend.report)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_unbacked_rows_from_a_boolean_index(poison, fallback, recwarn):
    """``x[mask]`` has a data-dependent (unbacked) number of rows, 0 included: the
    kernels take it with no guard and no recompile, and no deprecation warning from
    torch's hint API."""
    torch.manual_seed(0)
    lin, ln = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def fn(x, m):
        h = x[m]
        return torch.softmax(ln(torch.nn.functional.gelu(lin(h)) + h) * 0.5, -1)

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        compiled = torch.compile(fn, backend=backend)
        for rows in ([1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]):
            x, m = torch.randn(6, 8), torch.tensor(rows, dtype=torch.bool)
            with _common.count_launches() as launches:
                torch.testing.assert_close(compiled(x, m), fn(x, m), atol=1e-5, rtol=1e-5)
            if any(rows):
                assert launches["add_layer_norm_fwd"] == 1, launches
                assert launches["scale_mask_softmax_fwd"] == 1, launches
    assert len(backend.report.graphs) == 1 and backend.report.graphs[0].guards_added == []
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [
        str(w.message) for w in recwarn
    ]


class _ConvNeXtTail(torch.nn.Module):
    """linear -> GELU -> linear -> layer scale, on a permuted [B, C, H, W] input."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.pw1, self.pw2 = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)
        self.gamma = torch.nn.Parameter(torch.rand(c))

    def forward(self, x):
        y = self.pw2(torch.nn.functional.gelu(self.pw1(x.permute(0, 2, 3, 1))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def test_dynamic_shapes_fuse_as_static_ones(poison):
    """Under ``dynamic=True`` a view's size is computed by its own nodes: a view read
    only for its size (``sym_size``) kept a GEMM result written (``mm_epilogue_multi``
    instead of ``mm_epilogue``).  The launches are the static ones."""
    torch.manual_seed(0)
    model = _ConvNeXtTail()
    x = torch.randn(2, 16, 6, 6)  # (square: one symbol for H and W, as ConvNeXt's)
    runs = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        backend = tilebackend.TileBackend(options={"fallback": "eager"})
        with _common.count_launches() as launches, torch.no_grad():
            out = torch.compile(model, backend=backend, dynamic=dynamic)(x)
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
        runs[dynamic] = dict(launches)
    assert runs[True] == runs[False] == {"mm_epilogue": 2}, runs
