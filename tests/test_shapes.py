"""Symbolic shapes: sympy proofs and refusals, and one compile serving every size."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.fx.experimental._config as fx_config
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
