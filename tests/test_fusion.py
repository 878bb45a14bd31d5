"""Fused regions: each shape becomes one tile kernel with no leftover ATen pointwise ops
for the fused part, and matches eager forward and backward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import grads_like_eager

import tilebackend
from tilebackend.codegen import _common

POINTWISE = ("aten.tanh", "aten.pow", "aten.relu", "aten.silu", "aten.gelu", "aten.add.Tensor")


def gelu_tanh(x):  # GPT-2's NewGELUActivation, written out
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


def _run(fn, *args, atol=1e-4, rtol=1e-4):
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with torch.no_grad():
        with _common.count_launches() as launches:
            out = torch.compile(fn, backend=backend)(*args)
        ref = fn(*args)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, equal_nan=True)
    (graph,) = backend.report.graphs
    return graph, launches


def _train_step(fn, *args, fallback="eager"):
    """One training step of ``fn`` compiled afresh (loss: the sum of the squared output,
    in fp32): ``(backend, launches)``; the gradients are left on the leaves."""
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        torch.compile(fn, backend=backend)(*args).float().square().sum().backward()
    return backend, launches


@pytest.mark.parametrize("rank", [3, 4])
def test_a_batched_gemm_epilogue_is_fused(poison, rank):
    """Pointwise users of a bmm (a 4-D matmul is a bmm between views) are its epilogue,
    as a 2-D GEMM's are (they stayed separate ops; see tests/test_fusion_bmm.py)."""
    lead = (2,) * (rank - 2)
    a, b = torch.randn(*lead, 5, 7), torch.randn(*lead, 7, 3)
    graph, launches = _run(lambda a, b: torch.sigmoid(a @ b) * 2, a, b)
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    assert graph.counts.get("fused_bmm_epilogue") == 1, str(graph)
    assert not [s for s in graph.skipped if s.pattern == "fusion"]


def test_half_gemm_times_a_0dim_fp32_tensor_fuses(poison):
    """``(a16 @ b16) * scale`` with ``scale`` an fp32 0-dim tensor is fp16 in eager (a
    0-dim tensor does not widen a dimensioned one of its category); the epilogue's dtype
    rule agreed only after learning that, so it was refused as a dtype mismatch."""
    a, b = torch.randn(5, 7, dtype=torch.float16), torch.randn(7, 3, dtype=torch.float16)
    scale = torch.tensor(0.37)
    graph, launches = _run(lambda a, b, s: (a @ b) * s + 1, a, b, scale, atol=2e-3, rtol=2e-3)
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    assert graph.counts.get("fused_mm_epilogue") == 1, graph.skipped


@pytest.mark.parametrize(
    "name, make",
    [
        ("gpt2_gelu_written_out", lambda lin: lambda x: gelu_tanh(lin(x))),
        ("gelu_tanh", lambda lin: lambda x: F.gelu(lin(x), approximate="tanh")),
        ("gelu_erf", lambda lin: lambda x: F.gelu(lin(x))),
        ("silu_scaled", lambda lin: lambda x: F.silu(lin(x)) * 0.5),
        ("relu_cast", lambda lin: lambda x: torch.relu(lin(x)).to(torch.float16)),
    ],
)
def test_matmul_epilogue_is_one_kernel(poison, name, make):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(2, 5, 16)
    graph, launches = _run(make(lin), x)
    assert graph.counts.get("fused_mm_epilogue") == 1, str(graph)
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    for op in POINTWISE:
        assert op not in graph.code, (op, graph.code)


def test_residual_add_in_epilogue_with_broadcast_extra(poison):
    lin = torch.nn.Linear(16, 24)
    x, r = torch.randn(7, 16), torch.randn(1, 24)
    graph, launches = _run(lambda x, r: torch.relu(lin(x)) + r, x, r)
    assert dict(launches) == {"mm_epilogue": 1}
    assert graph.counts.get("fused_mm_epilogue") == 1


@pytest.mark.parametrize(
    "x_shape, p_shape", [((2, 7, 16), (1, 1, 24)), ((2, 3, 5, 16), (1, 1, 1, 24))]
)
def test_epilogue_extras_stored_with_leading_ones(poison, x_shape, p_shape):
    """A layer scale and shift stored ``[1, 1, N]`` (ConvNeXtV2's GRN, LayerScale modules)
    read as the ``[N]`` they are: one launch, as ``[N]`` parameters would be."""
    lin = torch.nn.Linear(16, 24)
    g, b = torch.randn(p_shape), torch.randn(p_shape)
    graph, launches = _run(lambda x: F.gelu(lin(x) * g + b), torch.randn(x_shape))
    assert dict(launches) == {"mm_epilogue": 1}, (dict(launches), str(graph))
    assert graph.counts.get("fused_mm_epilogue") == 1


def test_eval_dropout_clone_is_fused_through(poison):
    """In eval, ``nn.Dropout`` leaves an ``aten.clone`` (no decompositions with the eager
    fallback): the identity, fused through, so the layer scale and residual still fuse."""
    lin, drop, gamma = torch.nn.Linear(16, 16), torch.nn.Dropout(0.1).eval(), torch.rand(16)
    graph, launches = _run(lambda x: x + gamma * drop(lin(x)), torch.randn(2, 5, 16))
    assert dict(launches) == {"mm_epilogue": 1}, (dict(launches), str(graph))
    assert "aten.clone" not in graph.code, graph.code


def test_a_gemm_whose_only_epilogue_is_a_copy_keeps_its_plain_kernel(poison):
    """An eval-mode dropout's clone (or ``.clone()``) alone after a GEMM: the copy is
    dropped (the GEMM's result is fresh), no identity epilogue kernel is made; two such
    linears of one input are then one grouped launch."""
    lin, lin2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    drop = torch.nn.Dropout(0.1).eval()

    def fn(x):
        return torch.cat([drop(lin(x)), lin2(x).clone()], -1)

    graph, launches = _run(fn, torch.randn(2, 3, 8))
    assert dict(launches) == {"grouped_mm": 1}, (dict(launches), str(graph))
    assert "aten.clone" not in graph.code and "mm_epilogue" not in graph.code, graph.code


def _assert_one_dual_launch(graph, launches, others=None):
    assert graph.counts.get("fused_dual_mm_epilogue") == 1, str(graph)
    assert "fused_mm_epilogue" not in graph.counts, str(graph)
    assert dict(launches) == {"dual_mm_epilogue": 1, **(others or {})}, dict(launches)
    assert "aten.silu" not in graph.code and "aten.mul" not in graph.code, graph.code


def test_swiglu_is_one_dual_gemm(poison):
    w1, w3 = torch.randn(16, 8), torch.randn(16, 8)
    x = torch.randn(5, 16)
    graph, launches = _run(lambda x: F.silu(x @ w1) * (x @ w3), x)
    _assert_one_dual_launch(graph, launches)
    assert "aten.mm" not in graph.code and "tile.mm." not in graph.code, graph.code
    (r,) = [r for r in graph.replacements if r.pattern == "fused_dual_mm_epilogue"]
    assert r.targets == ["mm", "mm", "silu", "mul.Tensor"]
    assert r.scalars["expr"] == '["mul",["silu","ACC"],"ACC1"]'


class _LlamaMLP(torch.nn.Module):
    """``down(silu(gate(x)) * up(x))``, as Llama's MLP."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(dim, hidden, bias=bias)
        self.up_proj = torch.nn.Linear(dim, hidden, bias=bias)
        self.down_proj = torch.nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)
def test_llama_mlp_gate_and_up_are_one_launch(poison, bias, dtype, tol):
    torch.manual_seed(0)
    mlp = _LlamaMLP(16, 24, bias).to(dtype)
    x = torch.randn(2, 5, 16).to(dtype)  # 3-D: each linear views x as [10, 16]
    graph, launches = _run(mlp, x, atol=tol, rtol=tol)
    down = "addmm" if bias else "mm"  # the down projection stays a GEMM of its own
    _assert_one_dual_launch(graph, launches, {down: 1})
    assert graph.code.count(f"tile.{down}.default(") == 1, graph.code


@pytest.mark.parametrize("M, K, N", [(1, 16, 24), (7, 13, 17), (13, 17, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)
def test_swiglu_odd_sizes_with_biases(poison, M, K, N, dtype, tol):
    gate, up = torch.nn.Linear(K, N).to(dtype), torch.nn.Linear(K, N).to(dtype)
    x = torch.randn(M, K).to(dtype)
    graph, launches = _run(lambda x: F.silu(gate(x)) * up(x), x, atol=tol, rtol=tol)
    _assert_one_dual_launch(graph, launches)
    (r,) = [r for r in graph.replacements if r.pattern == "fused_dual_mm_epilogue"]
    assert r.targets[:2] == ["addmm", "addmm"]


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_swiglu_noncontiguous_a(poison, kind):
    """Each GEMM gets its own ``x.t()`` / ``x[:, ::2]`` node: the same view, one input."""
    w1, w3 = torch.randn(16, 24), torch.randn(16, 24)
    if kind == "transposed":
        x, view = torch.randn(16, 7), lambda x: x.t()
    else:
        x, view = torch.randn(7, 32), lambda x: x[:, ::2]
    graph, launches = _run(lambda x: F.silu(view(x) @ w1) * (view(x) @ w3), x)
    _assert_one_dual_launch(graph, launches)


def test_llama_mlp_dual_gemm_under_dynamic_shapes(poison):
    """One graph for every size, the pair found on symbolic shapes without a guard."""
    torch._dynamo.reset()
    mlp = _LlamaMLP(16, 24)
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(mlp, backend=backend, dynamic=True)
    with torch.no_grad():
        for b, t in [(2, 3), (3, 5), (4, 7)]:
            x = torch.randn(b, t, 16)
            with _common.count_launches() as launches:
                torch.testing.assert_close(compiled(x), mlp(x), atol=1e-4, rtol=1e-4)
            assert dict(launches) == {"dual_mm_epilogue": 1, "mm": 1}, dict(launches)
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_dual_mm_epilogue") == 1, str(backend.report)
    assert graph.symbolic and graph.guards_added == [], str(backend.report)


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_residual_layer_norm_over_a_symbolic_hidden_size_adds_no_guard(poison, train):
    """``dynamic=True`` makes the normalized size symbolic too: the fused add+norm takes
    it as it is (no guard pinning it to the first call's size), and one graph serves
    every hidden size.  (RMS norm written out: ``tests/test_shapes.py``.)"""
    torch._dynamo.reset()

    def fn(x, r, w, b):
        return F.layer_norm(x + r, (x.shape[-1],), w, b)

    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(fn, backend=backend, dynamic=True)
    for rows, hidden in [(3, 7), (5, 12), (2, 33)]:
        args = [torch.randn(rows, hidden), torch.randn(rows, hidden)]
        args += [torch.randn(hidden), torch.randn(hidden)]
        args = [a.requires_grad_(train) for a in args]
        with torch.set_grad_enabled(train), _common.count_launches() as launches:
            out = compiled(*args)
            torch.testing.assert_close(out, fn(*args), atol=1e-4, rtol=1e-4)
        assert launches["add_layer_norm_fwd"] == 1, dict(launches)
        if train:
            out.sum().backward()
    fwd = backend.report.graphs[1 if train else 0]
    assert fwd.counts.get("fused_add_layer_norm") == 1, str(backend.report)
    assert all(g.guards_added == [] for g in backend.report.graphs), str(backend.report)
    assert len(backend.report.graphs) == (3 if train else 1), str(backend.report)


def test_swiglu_gemm_result_used_outside_keeps_two_launches(poison):
    """h1 is also returned: it must be written, so the pair is not fused and the gate
    fuses into the second GEMM's epilogue; that epilogue also computes ``silu(h1)`` from
    h1, which is then all the first GEMM writes (it used to write ``silu(h1)`` too)."""
    w1, w3 = torch.randn(16, 8), torch.randn(16, 8)
    x = torch.randn(5, 16)

    def fn(x):
        h1 = x @ w1
        return F.silu(h1) * (x @ w3), h1

    graph, launches = _run(fn, x)
    assert "fused_dual_mm_epilogue" not in graph.counts, str(graph)
    assert dict(launches) == {"mm": 1, "mm_epilogue": 1}, dict(launches)
    (fused,) = [r for r in graph.replacements if r.pattern == "fused_mm_epilogue"]
    assert "silu" in fused.scalars["expr"], fused
    (why,) = [s.reason for s in graph.skipped if "dual GEMM" in s.reason]
    assert "not fused" in why, why


def test_chained_training_epilogues_both_fuse(poison):
    """A training forward's MLP with an activation after each linear: each GEMM's
    epilogue also writes the value the backward saves, and the second GEMM reads the
    first's fused result (it used to read the erased node: fusion failed with a
    KeyError and a warning)."""
    torch.manual_seed(0)
    x = torch.randn(5, 13, requires_grad=True)
    w1 = torch.randn(32, 13, requires_grad=True)
    w2 = torch.randn(24, 32, requires_grad=True)

    def fn(x):
        return F.gelu(F.linear(F.gelu(F.linear(x, w1)), w2))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (ours; not numpy's)
        backend, launches = _train_step(fn, x)
    assert launches["mm_epilogue_multi"] == 2, dict(launches)
    fwd = [g for g in backend.report.graphs if g.name == "forward"][0]
    assert fwd.counts.get("fused_mm_epilogue") == 2 and not fwd.notes, str(fwd)
    grads_like_eager([x, w1, w2], lambda: fn(x), atol=1e-4, rtol=1e-4)


def test_chained_gated_blocks_are_two_dual_gemms(poison):
    """A second SwiGLU block reads the first's product: each pair is one dual GEMM (the
    second pair used to read the replaced product: fusion failed, with a warning)."""
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    w1, w3 = torch.randn(32, 16) * 0.25, torch.randn(32, 16) * 0.25
    w4, w5 = torch.randn(8, 32) * 0.2, torch.randn(8, 32) * 0.2

    def fn(x):
        h = F.silu(F.linear(x, w1)) * F.linear(x, w3)
        return F.silu(F.linear(h, w4)) * F.linear(h, w5)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (ours; not numpy's)
        graph, launches = _run(fn, x)
    assert dict(launches) == {"dual_mm_epilogue": 2}, dict(launches)
    assert graph.counts.get("fused_dual_mm_epilogue") == 2 and not graph.notes, str(graph)


def test_swiglu_training_step_matches_eager(poison):
    """Training: the forward graph saves the GEMM results for the backward, so no dual
    GEMM there; gradients match eager."""
    torch.manual_seed(0)
    mlp = _LlamaMLP(16, 24)
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(mlp, backend=backend)
    compiled(x).square().sum().backward()
    grads_like_eager([*mlp.parameters(), x], lambda: mlp(x), atol=1e-4, rtol=1e-4)
    assert "fused_dual_mm_epilogue" not in backend.report.counts, str(backend.report)
    assert any("dual GEMM" in s.reason for s in backend.report.skipped), str(backend.report)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_swiglu_training_under_dynamic_shapes_fuses_the_gate(poison, fallback):
    """dynamic=True training: the GEMM's 2-D result is viewed back to 3-D with a symbolic
    batch x tokens, and the other GEMM's 3-D result reaches the gate as an extra input;
    it is read viewed as [-1, N] (N static), so the gate still fuses into the epilogue,
    for every size of one graph."""
    torch.manual_seed(0)
    mlp = _LlamaMLP(16, 24)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    compiled = torch.compile(mlp, backend=backend, dynamic=True)
    for b, t in [(2, 5), (3, 7)]:
        x = torch.randn(b, t, 16, requires_grad=True)
        mlp.zero_grad(set_to_none=True)
        with _common.count_launches() as launches:
            compiled(x).square().sum().backward()
        grads_like_eager([*mlp.parameters(), x], lambda x=x: mlp(x), atol=1e-4, rtol=1e-4)
        assert launches["mm_epilogue_multi"] + launches["mm_epilogue"] >= 1, dict(launches)
    fwd = [g for g in backend.report.graphs if g.name == "forward"]
    assert fwd and fwd[0].symbolic, str(backend.report)
    assert fwd[0].counts.get("fused_mm_epilogue", 0) >= 1, str(backend.report)
    assert not any("is not 2-D" in s.reason for s in fwd[0].skipped), str(backend.report)


class _GateUpMLP(torch.nn.Module):
    """Phi-3's MLP: one ``gate_up`` GEMM, chunked, then SwiGLU."""

    def __init__(self, bias: bool):
        super().__init__()
        self.gate_up = torch.nn.Linear(16, 48, bias=bias)
        self.down = torch.nn.Linear(24, 16, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.silu(gate))


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_gate_up_gemm_is_one_dual_kernel(poison, bias):
    mlp = _GateUpMLP(bias)
    x = torch.randn(2, 5, 16)
    graph, launches = _run(mlp, x, atol=1e-5, rtol=1e-5)
    assert graph.counts.get("fused_dual_mm_epilogue") == 1, str(graph)
    assert dict(launches) == {"dual_mm_epilogue": 1, "mm": 1}, dict(launches)
    assert "aten.split" not in graph.code and "aten.silu" not in graph.code


def test_chunked_gate_up_gemm_trains(poison):
    """In training the halves are saved for the backward: still right (two GEMMs of
    the halves, the gate's epilogue fused), gradients as eager's.  The backward's
    ``silu_backward`` epilogue reads the saved halves, strided views of the N-d product,
    through row strides (so its GEMM takes the N-d gradient), fused as well."""
    mlp = _GateUpMLP(True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    _, launches = _train_step(mlp, x)
    grads_like_eager([*mlp.parameters(), x], lambda: mlp(x), atol=1e-5, rtol=1e-4)
    assert launches["mm_epilogue_multi"] == 2, dict(launches)


@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_scale_mask_softmax_is_one_kernel(poison, mask_kind):
    x = torch.randn(2, 3, 7, 7)
    if mask_kind == "additive":
        mask = torch.randn(2, 1, 7, 7)  # broadcast over heads
        fn = lambda x, m: torch.softmax(x * 0.125 + m, dim=-1)  # noqa: E731
    else:
        mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
        fn = lambda x, m: torch.softmax((x / 8.0).masked_fill(m, float("-inf")), -1)  # noqa: E731
    graph, launches = _run(fn, x, mask)
    assert graph.counts.get("fused_scale_mask_softmax") == 1, str(graph)
    assert dict(launches) == {"scale_mask_softmax_fwd": 1}
    assert "aten.mul" not in graph.code and "aten.add" not in graph.code


_NEG_INF = float("-inf")


@pytest.mark.parametrize(
    "form, fallback",
    [
        # Inductor decomposes masked_fill into where(mask, full([], -inf), s)
        ("masked_fill", "inductor"),
        ("where_fill", "eager"),
        ("where_keep", "eager"),  # nanoGPT-style: keep where the causal mask is True
        ("where_keep", "inductor"),
    ],
)
def test_where_mask_softmax_is_one_kernel(poison, form, fallback):
    x = torch.randn(2, 3, 7, 7)
    causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    fns = {
        "masked_fill": lambda x, m: torch.softmax((x * 0.125).masked_fill(~m, _NEG_INF), -1),
        "where_fill": lambda x, m: torch.softmax(torch.where(~m, _NEG_INF, x / 8.0), -1),
        "where_keep": lambda x, m: torch.softmax(torch.where(m, x * 0.125, _NEG_INF), -1),
    }
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with torch.no_grad(), _common.count_launches() as launches:
        out = torch.compile(fns[form], backend=backend)(x, causal)
    torch.testing.assert_close(out, fns[form](x, causal), atol=1e-5, rtol=1e-5)
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_scale_mask_softmax") == 1, str(graph)
    assert dict(launches) == {"scale_mask_softmax_fwd": 1}, dict(launches)
    assert "aten.where" not in graph.code and "aten.full" not in graph.code, graph.code


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_where_mask_softmax_trains(poison, fallback):
    """nanoGPT's masked attention scores in training: the forward is one fused launch
    and the gradient is eager's."""
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))

    def fn(x, m):
        return torch.softmax(torch.where(m, x * 0.125, _NEG_INF), -1)

    backend, launches = _train_step(fn, x, causal, fallback=fallback)
    grads_like_eager([x], lambda: fn(x, causal), atol=1e-5, rtol=1e-5)
    assert launches["scale_mask_softmax_fwd"] == 1 and launches["softmax_bwd"] == 1, dict(launches)
    assert backend.report.counts.get("fused_scale_mask_softmax") == 1, str(backend.report)


def test_where_keep_mask_wider_than_the_scores_is_explained(poison):
    """where(keep, s, -inf) whose condition broadcasts the scores wider: not fused, the
    report says why, and the graph's other fusions stand (a missing mask name here
    used to fail the whole fusion pass)."""
    x, keep = torch.randn(7, 7), torch.rand(2, 7, 7) < 0.5
    keep[..., 0] = True  # (no all-masked rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graph, launches = _run(
            lambda x, m: torch.softmax(torch.where(m, x * 0.5, _NEG_INF), -1), x, keep
        )
    assert dict(launches) == {"softmax_fwd": 1}, dict(launches)
    assert not any("fusion failed" in n for n in graph.notes), graph.notes
    notes = [s.reason for s in graph.skipped if s.pattern == "fusion"]
    assert any("does not broadcast to [7, 7]" in n for n in notes), notes


def _mpt_scores(x, bias, m):
    """MPT's attention scores: scaled, an ALiBi bias added, masked with a finite fill."""
    z = x * 0.35 + bias
    return torch.softmax(z.masked_fill(m, torch.finfo(x.dtype).min), -1)


def _mpt_inputs(dtype=torch.float32, bias_dtype=torch.float32, requires_grad=False):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 11, dtype=dtype, requires_grad=requires_grad)
    bias = torch.randn(3, 1, 11, dtype=bias_dtype)  # per head, broadcast over queries
    m = torch.rand(2, 1, 7, 11) < 0.3
    m[1, 0, 2] = True  # an all-masked row: uniform with a finite fill (NaN with -inf)
    return x, bias, m


@pytest.mark.parametrize(
    "form, fallback",
    [
        ("masked_fill", "eager"),
        ("masked_fill", "inductor"),
        ("where_keep", "eager"),
        ("int_zero_fill", "eager"),  # masked_fill(m, 0): an int fill, entries kept at 0
    ],
)
def test_finite_fill_after_a_bias_is_one_kernel(poison, form, fallback):
    """MPT's scale + ALiBi bias + masked_fill(finfo.min) prologue (and the where(keep, s,
    fill) form) is one launch, all-masked rows included."""
    x, bias, m = _mpt_inputs()
    fns = {
        "masked_fill": _mpt_scores,
        "where_keep": lambda x, b, m: torch.softmax(torch.where(~m, x * 0.35 + b, -1e4), -1),
        "int_zero_fill": lambda x, b, m: torch.softmax((x * 0.35 + b).masked_fill(m, 0), -1),
    }
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with torch.no_grad(), _common.count_launches() as launches:
        out = torch.compile(fns[form], backend=backend)(x, bias, m)
    ref = fns[form](x, bias, m)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_scale_mask_softmax") == 1, str(graph)
    assert dict(launches) == {"scale_mask_softmax_fwd": 1}, dict(launches)
    (rep,) = [r for r in graph.replacements if r.pattern == "fused_scale_mask_softmax"]
    assert rep.scalars["mask_mode"] == "add+fill", rep.scalars
    assert rep.scalars["fill"] == 0 if form == "int_zero_fill" else rep.scalars["fill"] < -1e3
    for op in ("aten.where", "aten.masked_fill", "aten.add", "aten.mul"):
        assert op not in graph.code, graph.code


def _t5_scores(x, pb, mask):
    """T5's eager attention: scores (scaled by 1), its position bias added, then its
    additive attention mask."""
    return torch.softmax(x * 1.0 + pb + mask, dim=-1)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_position_bias_and_mask_added_is_one_kernel(poison, fallback):
    """T5: two added tensors (a per-head position bias, a per-batch mask with -inf and
    finfo.min entries) go into the kernel, in eager's order; both get their gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    pb = torch.randn(1, 3, 7, 9, requires_grad=True)
    mask = torch.zeros(2, 1, 7, 9)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    mask[0, ..., 4] = -math.inf
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with torch.no_grad(), _common.count_launches() as launches:
        out = torch.compile(_t5_scores, backend=backend)(x, pb, mask)
    torch.testing.assert_close(out, _t5_scores(x, pb, mask), atol=1e-6, rtol=1e-5)
    assert dict(launches) == {"scale_mask_softmax_fwd": 1}, dict(launches)
    (graph,) = backend.report.graphs
    (rep,) = [r for r in graph.replacements if r.pattern == "fused_scale_mask_softmax"]
    assert rep.scalars["mask_mode"] == "add+add" and rep.inputs["bias"].startswith("float32[1, 3")
    assert "aten.add" not in graph.code and "aten.mul" not in graph.code, graph.code
    # training: the forward is the one launch, the gradients eager's
    _, launches = _train_step(_t5_scores, x, pb, mask, fallback=fallback)
    grads_like_eager([x, pb], lambda: _t5_scores(x, pb, mask), atol=1e-5, rtol=1e-5)
    assert launches["scale_mask_softmax_fwd"] == 1, dict(launches)


def _mpt_half_attention(x, bias, m):
    """MPT's eager attention in half precision: the fp32 ALiBi bias promotes the scores,
    the softmax runs in fp32 and its result is cast back to the scores' dtype."""
    z = (x * 0.35 + bias).masked_fill(m, torch.finfo(x.dtype).min)
    return torch.softmax(z.float(), -1).to(x.dtype)


@pytest.mark.parametrize(
    "fn, dtype, bias_dtype, tol",
    [
        (_mpt_scores, torch.float16, torch.float32, 2e-3),  # fp32 result, as eager's
        (_mpt_scores, torch.bfloat16, torch.bfloat16, 1.6e-2),
        (_mpt_half_attention, torch.float16, torch.float32, 2e-3),  # stored as fp16
        (_mpt_half_attention, torch.bfloat16, torch.float32, 1.6e-2),
    ],
    ids=["fp16_fp32bias", "bf16", "fp16_cast_back", "bf16_cast_back"],
)
def test_finite_fill_half_scores(poison, fn, dtype, bias_dtype, tol):
    x, bias, m = _mpt_inputs(dtype, bias_dtype)
    graph, launches = _run(fn, x, bias, m, atol=tol, rtol=tol)
    assert dict(launches) == {"scale_mask_softmax_fwd": 1}, dict(launches)
    assert graph.counts.get("fused_scale_mask_softmax") == 1, str(graph)
    assert "_to_copy" not in graph.code and "convert_element_type" not in graph.code, graph.code


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_finite_fill_after_a_bias_trains(poison, fallback):
    """In training the filled entries pass no gradient, also in an all-masked row (where
    the probabilities are uniform, not zero), and the bias gets its summed gradient."""
    x, bias, m = _mpt_inputs(requires_grad=True)
    bias.requires_grad_(True)
    backend, launches = _train_step(_mpt_scores, x, bias, m, fallback=fallback)
    grads_like_eager([x, bias], lambda: _mpt_scores(x, bias, m), atol=1e-5, rtol=1e-5)
    assert launches["scale_mask_softmax_fwd"] == 1, dict(launches)
    assert backend.report.counts.get("fused_scale_mask_softmax") == 1, str(backend.report)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"]
)
def test_half_attention_softmax_in_float32_is_one_kernel(poison, dtype, tol):
    """Llama's eager attention in half precision: ``softmax(s * c + mask, dtype=float32)
    .to(s.dtype)``: the upcast, the prologue and the cast back are one kernel (fp32 math,
    one rounding to the half result)."""
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    mask = torch.randn(2, 1, 7, 7, dtype=dtype)

    def fn(x, m):
        return F.softmax(x * 0.125 + m, dim=-1, dtype=torch.float32).to(x.dtype)

    graph, launches = _run(fn, x, mask, atol=tol, rtol=tol)
    assert graph.counts.get("fused_scale_mask_softmax") == 1, str(graph)
    assert dict(launches) == {"scale_mask_softmax_fwd": 1}
    assert "_to_copy" not in graph.code and "aten.add" not in graph.code


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"]
)
def test_half_attention_softmax_trains_with_its_prologue_fused(poison, dtype, tol, fallback):
    """In training the fp32 probabilities are saved for the backward, so the cast back
    stays; the half scores' scale and mask still join the kernel, which stores fp32.
    The backward is one kernel too: it reads the half gradient and the fp32
    probabilities and writes the half scores' gradient, upcast, cast back and scale
    absorbed."""
    x = torch.randn(2, 3, 7, 7, dtype=dtype, requires_grad=True)
    mask = torch.randn(2, 1, 7, 7, dtype=dtype)

    def fn(x, m):
        return F.softmax(x * 0.3 + m, dim=-1, dtype=torch.float32).to(x.dtype)

    backend, launches = _train_step(fn, x, mask, fallback=fallback)
    assert launches["scale_mask_softmax_fwd"] == 1, dict(launches)
    assert "softmax_fwd" not in launches, dict(launches)
    assert launches["scale_mask_softmax_bwd"] == 1 and "softmax_bwd" not in launches
    (bwd,) = [r for r in backend.report.graphs[-1].replacements if "backward" in r.pattern]
    assert bwd.pattern == "fused_softmax_backward" and "mul.Tensor" in bwd.targets, bwd.targets
    assert sum(t.startswith("_to_copy") or "convert" in t for t in bwd.targets) == 2, bwd
    (rep,) = [
        r
        for g in backend.report.graphs
        for r in g.replacements
        if r.pattern == "fused_scale_mask_softmax"
    ]
    assert rep.scalars["dtype"] == "torch.float32", rep.scalars
    got = x.grad.clone()
    x.grad = None
    fn(x, mask).float().square().sum().backward()
    torch.testing.assert_close(got, x.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("sum_used", [False, True])
def test_residual_add_norm_is_one_kernel(poison, norm, sum_used):
    w = torch.randn(16)
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)

    def fn(x, r):
        s = x + r
        y = F.layer_norm(s, (16,), w) if norm == "layer" else F.rms_norm(s, (16,), w, 1e-6)
        return (y, s * 2) if sum_used else y

    graph, launches = _run(fn, x, r)
    kernel = f"add_{norm}_norm_fwd"
    assert launches[kernel] == 1, dict(launches)
    assert graph.counts.get(f"fused_add_{norm}_norm") == 1, str(graph)
    assert "aten.add.Tensor" not in graph.code


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("rows", ["3d_to_2d", "2d_to_3d"])
def test_residual_add_viewed_before_the_norm_is_one_kernel(poison, norm, rows):
    """OPT: ``(residual + h).view(shape)`` is the next norm's input and the next
    residual; the view regroups rows, so the norm of the view is the view of the norm.
    Training too: the norm's saved statistics are viewed back for its backward."""
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    full, viewed = ((3, 5, 16), (-1, 16)) if rows == "3d_to_2d" else ((15, 16), (3, 5, 16))

    def fn(x, r):
        s = (x + r).view(viewed)
        y = F.layer_norm(s, (16,), w, b) if norm == "layer" else F.rms_norm(s, (16,), w, 1e-6)
        return y * torch.sigmoid(s)

    x, r = torch.randn(full), torch.randn(full)
    graph, launches = _run(fn, x, r)
    assert launches[f"add_{norm}_norm_fwd"] == 1, dict(launches)
    assert graph.counts.get(f"fused_add_{norm}_norm") == 1, str(graph)
    assert "aten.add.Tensor" not in graph.code, graph.code

    x.requires_grad_(), r.requires_grad_()
    backend, launches = _train_step(fn, x, r)
    grads_like_eager([x, r, w, b] if norm == "layer" else [x, r, w], lambda: fn(x, r), 1e-4, 1e-4)
    (fwd,) = [g for g in backend.report.graphs if g.name == "forward"]
    assert fwd.counts.get(f"fused_add_{norm}_norm") == 1, str(fwd)
    assert launches[f"add_{norm}_norm_fwd"] == 1 and launches[f"{norm}_norm_bwd"] == 1, dict(
        launches
    )


def test_intermediate_used_elsewhere_is_written_too(poison):
    """``h`` is an output and ``tanh(h)`` reads it: one kernel writes both (before, the
    closed region ``lin * 2`` was fused and the tanh was a pass of its own)."""
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(4, 16)

    def fn(x):
        h = lin(x) * 2.0
        return torch.tanh(h), h  # h must still be written

    graph, launches = _run(fn, x)
    assert dict(launches) == {"mm_epilogue_multi": 1}, dict(launches)
    assert "aten.tanh" not in graph.code and "aten.mul" not in graph.code, graph.code
    (rep,) = [r for r in graph.replacements if r.pattern == "fused_mm_epilogue"]
    assert rep.scalars["extra_outputs"] == 1, rep


def test_fused_training_step_matches_eager(poison):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU("tanh"), torch.nn.Linear(32, 16)
    )
    ln = torch.nn.LayerNorm(16)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def fn(x):
        return torch.softmax(ln(x + mlp(x)) * 0.5, -1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=tilebackend.TileBackend(options={"fallback": "eager"}))
    with _common.count_launches() as launches:
        compiled(x).square().sum().backward()
    params = [*mlp.parameters(), *ln.parameters()]
    grads_like_eager([*params, x], lambda: fn(x), atol=1e-4, rtol=1e-4)
    assert launches["layer_norm_bwd"] >= 1 or launches["add_layer_norm_fwd"] >= 1


@pytest.mark.parametrize(
    "name, fn, reason",
    [
        ("alpha", lambda x, r, w: F.layer_norm(torch.add(x, r, alpha=0.5), (16,), w), "alpha"),
        ("scalar", lambda x, r, w: F.layer_norm(x + 1.5, (16,), w), "scalar"),
        # r broadcasts across the rows: each row gets another residual, not a repeat
        ("columns", lambda x, r, w: F.layer_norm(x + r[:, :1], (16,), w), "rows' shape"),
        ("dtypes", lambda x, r, w: F.layer_norm(x + r.half(), (16,), w), "mixed"),
    ],
)
def test_residual_add_left_out_of_the_norm_is_explained(poison, name, fn, reason):
    """The norm still runs as a tile kernel; the report says why the add did not join."""
    w = torch.randn(16)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    graph, launches = _run(lambda x, r: fn(x, r, w), x, r)
    assert "fused_add_layer_norm" not in graph.counts and launches["layer_norm_fwd"] == 1
    notes = [s.reason for s in graph.skipped if s.pattern == "fusion"]
    assert any(reason in n for n in notes), notes


def test_residual_sum_read_before_the_norm(poison):
    """The sum is used before the norm in graph order: the fused op goes where the add was."""
    w = torch.randn(16)
    x, r = torch.randn(4, 16), torch.randn(4, 16)

    def fn(x, r):
        s = x + r
        t = torch.sigmoid(s)  # reads the sum first
        return F.layer_norm(s, (16,), w) + t

    graph, launches = _run(fn, x, r)
    assert launches["add_layer_norm_fwd"] == 1
    assert graph.counts.get("fused_add_layer_norm") == 1


def test_softmax_prologue_respects_alpha(poison):
    x, m = torch.randn(2, 5, 5), torch.randn(2, 5, 5)
    graph, _ = _run(lambda x, m: torch.softmax(torch.add(x * 0.5, m, alpha=2.0), -1), x, m)
    assert "fused_scale_mask_softmax" not in graph.counts  # alpha != 1: not this shape
    (note,) = [s.reason for s in graph.skipped if s.pattern == "fusion"]
    assert "add.Tensor" in note and "added tensors (alpha 1;" in note, note


@pytest.mark.parametrize(
    "name, fn, reason",
    [
        # the scores broadcast up to the added tensor's shape: the kernel writes x's
        (
            "scores_broadcast",
            lambda x, m: torch.softmax(x[:1] * 0.5 + m, -1),
            "broadcast to [1, 6]",
        ),
        ("tensor_scale", lambda x, m: torch.softmax(x * m.sum() + m, -1), "is not a constant"),
        ("softmax_dim_0", lambda x, m: torch.softmax(x * 0.5 + m, 0), "not the last"),
    ],
)
def test_softmax_prologue_left_out_is_explained(poison, name, fn, reason):
    """What the kernel cannot take stays outside it, and the report says why; the
    softmax (with whatever prologue it could take) is still a tile kernel."""
    x, m = torch.randn(6, 6), torch.randn(6, 6)
    graph, launches = _run(fn, x, m)
    notes = [s.reason for s in graph.skipped if s.pattern == "fusion"]
    assert any(reason in n for n in notes), notes
    if name == "tensor_scale":  # the mask joins the kernel, the scale does not
        assert dict(launches) == {"scale_mask_softmax_fwd": 1}, dict(launches)
    else:
        assert "fused_scale_mask_softmax" not in graph.counts
        assert dict(launches) == {"softmax_fwd": 1}, dict(launches)


# --- training forwards: the epilogue also writes what the backward saves ---------------


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize(
    "act",
    [
        pytest.param(gelu_tanh, id="gpt2_gelu_written_out"),
        pytest.param(lambda h: F.gelu(h, approximate="tanh"), id="gelu_tanh"),
        pytest.param(lambda h: F.silu(h) * 0.5, id="silu_scaled"),
    ],
)
def test_training_forward_epilogue_writes_saved_values(poison, fallback, act):
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def fn(x):
        return lin2(act(lin1(x)))

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    compiled = torch.compile(fn, backend=backend)
    with _common.count_launches() as launches:
        out = compiled(x)
    out.square().sum().backward()
    params = [*lin1.parameters(), *lin2.parameters()]
    ref = grads_like_eager([*params, x], lambda: fn(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    (fwd,) = [g for g in backend.report.graphs if g.name == "forward"]
    (r,) = [r for r in fwd.replacements if r.pattern == "fused_mm_epilogue"]
    assert 1 <= r.scalars["extra_outputs"] <= 4, str(fwd)
    assert "tile.mm_epilogue_multi" in fwd.code, fwd.code
    for op in ("aten.tanh", "aten.pow", "aten.silu", "aten.gelu", "aten.mul"):
        assert op not in fwd.code, (op, fwd.code)
    # the forward: lin1 + its epilogue is one kernel, lin2 a plain GEMM
    assert launches["mm_epilogue_multi"] == 1 and "mm_epilogue" not in launches, dict(launches)


def test_open_epilogue_input_computed_late_moves_up(poison):
    """The GEMM result is read (by a sum) before the residual the epilogue needs is
    computed: the residual's ops move up, so the kernel that also writes the result runs
    before the sum."""
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(4, 16)

    def fn(x):
        h = lin(x)
        s = h.sum()
        r = x.sum(-1, keepdim=True)
        return torch.relu(h) + r, s

    graph, launches = _run(fn, x)
    assert dict(launches) == {"mm_epilogue_multi": 1}, (dict(launches), str(graph))


def test_open_epilogue_value_used_before_the_fused_op_could_run(poison):
    """As above, but the residual draws random numbers: moving it would reorder the
    generator's draws, so the add stays outside; the ReLU, which needs nothing drawn
    late, is fused on its own (before, nothing was)."""
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(4, 16)

    def fn(x):
        h = lin(x)
        s = torch.rand(()) + h.sum()
        r = torch.rand(4, 1)
        return torch.relu(h) + r, s

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    torch.manual_seed(3)
    with torch.no_grad(), _common.count_launches() as launches:
        out, s = torch.compile(fn, backend=backend)(x)
    torch.manual_seed(3)
    ref, s_ref = fn(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-5)
    assert dict(launches) == {"mm_epilogue_multi": 1}, dict(launches)
    (graph,) = backend.report.graphs
    assert "aten.relu" not in graph.code and "aten.add.Tensor" in graph.code, graph.code


def test_open_epilogue_writes_the_gemm_result(poison):
    """Inference too: the GEMM result is returned, so the region is not closed."""
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(7, 16)

    def fn(x):
        h = lin(x)
        return h, torch.tanh(h * 2.0)

    graph, launches = _run(fn, x)
    assert dict(launches) == {"mm_epilogue_multi": 1}, dict(launches)
    (r,) = [r for r in graph.replacements if r.pattern == "fused_mm_epilogue"]
    assert r.scalars["extra_outputs"] == 1, str(graph)
    assert "aten.tanh" not in graph.code and "aten.mul" not in graph.code, graph.code


@pytest.mark.parametrize(
    "act",
    [
        lambda h: F.gelu(h),
        lambda h: F.gelu(h, approximate="tanh"),
        torch.tanh,
        torch.sigmoid,
        F.silu,
        torch.relu,
        F.hardswish,
        F.hardsigmoid,
        F.mish,
        lambda h: F.softplus(h, beta=2.0, threshold=4.0),
        lambda h: F.elu(h, alpha=0.5),
        F.selu,
        lambda h: F.leaky_relu(h, 0.1),
        lambda h: F.hardtanh(h, -0.5, 0.75),
    ],
    ids=[
        "gelu",
        "gelu_tanh",
        "tanh",
        "sigmoid",
        "silu",
        "relu",
        "hardswish",
        "hardsigmoid",
        "mish",
        "softplus",
        "elu",
        "selu",
        "leaky_relu",
        "hardtanh",
    ],
)
def test_activation_backward_fuses_into_the_dgrad_gemm(poison, act):
    """The backward graph's ``gelu_backward`` / ``tanh_backward`` / ``sigmoid_backward``
    after the GEMM that computes the activation's output gradient is its epilogue."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    params = [*lin1.parameters(), *lin2.parameters()]

    def fn(x):
        return lin2(act(lin1(x)))

    x = torch.randn(2, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(fn, backend=backend)
    out = compiled(x)
    with _common.count_launches() as launches:  # the backward alone
        out.square().sum().backward()
    assert launches["mm_epilogue"] == 1, dict(launches)
    grads_like_eager([*params, x], lambda: fn(x), atol=1e-5, rtol=1e-4)
    (bwd,) = [g for g in backend.report.graphs if g.name == "backward"]
    assert "_backward.default" not in bwd.code.replace("tile.", ""), bwd.code
    assert bwd.counts.get("fused_mm_epilogue") == 1, str(backend.report)


@pytest.mark.parametrize(
    "act1, act2, names",
    [
        (F.mish, lambda h: F.softplus(h, beta=2.0, threshold=3.0), ("mish", "softplus")),
        (F.hardswish, lambda h: F.leaky_relu(h, 0.2), ("hardswish", "leaky_relu")),
        (lambda h: F.elu(h, alpha=0.7), lambda h: h.clamp(-1.0, 1.5), ("elu", "clamp")),
    ],
    ids=["mish_softplus", "hardswish_leaky_relu", "elu_clamp"],
)
def test_mlp_with_new_activations_trains_fused(poison, act1, act2, names):
    """A 2-layer MLP with an activation after each GEMM, in training: both forward GEMMs
    take their activation as the epilogue (no ATen activation left in the forward graph),
    the first activation's backward is the dgrad GEMM's epilogue; forward and grads match
    eager."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 24)
    params = [*lin1.parameters(), *lin2.parameters()]

    def fn(x):
        return act2(lin2(act1(lin1(x))))

    x = (torch.randn(3, 5, 16) * 2).requires_grad_()
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(fn, backend=backend)
    with _common.count_launches() as fwd_launches:
        out = compiled(x)
    with _common.count_launches() as bwd_launches:
        out.square().sum().backward()
    ref = grads_like_eager([*params, x], lambda: fn(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)

    graphs = {g.name: g for g in backend.report.graphs}
    fwd, bwd = graphs["forward"], graphs["backward"]
    fused = [r for r in fwd.replacements if r.pattern == "fused_mm_epilogue"]
    assert len(fused) == 2, str(fwd)
    for name in names:
        assert f"aten.{name}." not in fwd.code, (name, fwd.code)
    assert sum(fwd_launches[k] for k in ("mm_epilogue", "mm_epilogue_multi")) == 2, dict(
        fwd_launches
    )
    assert f"aten.{names[0]}_backward" not in bwd.code, bwd.code
    assert bwd.counts.get("fused_mm_epilogue", 0) >= 1, str(bwd)
    assert bwd_launches["mm_epilogue"] + bwd_launches["mm_epilogue_multi"] >= 1, dict(bwd_launches)


@pytest.mark.parametrize("order", ["x_plus_pos", "pos_plus_x"])
def test_embedding_sum_with_broadcast_positions_fuses_into_add_layer_norm(poison, order):
    """BERT / DistilBERT / ALBERT / ELECTRA embeddings: ``LayerNorm(tokens + positions)``
    with the position embeddings ``[1, S, H]`` shared by the batch: one add+norm kernel,
    in inference and (gradients too, the positions' summed over the batch) in training."""
    emb, pos = torch.nn.Embedding(50, 32), torch.nn.Embedding(16, 32)
    ln = torch.nn.LayerNorm(32)

    def f(ids):
        p = pos(torch.arange(ids.shape[1]).unsqueeze(0))
        e = emb(ids)
        return ln(e + p if order == "x_plus_pos" else p + e)

    ids = torch.randint(0, 50, (3, 7))
    graph, launches = _run(f, ids, atol=1e-5, rtol=1e-5)
    assert graph.counts.get("fused_add_layer_norm") == 1, str(graph)
    assert dict(launches) == {"add_layer_norm_fwd": 1}, dict(launches)
    assert "aten.add.Tensor" not in graph.code, graph.code

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    out = torch.compile(f, backend=backend)(ids)
    out.square().sum().backward()
    params = [emb.weight, pos.weight, ln.weight, ln.bias]
    grads_like_eager(params, lambda: f(ids), atol=1e-4, rtol=1e-4)
    (fwd,) = [g for g in backend.report.graphs if g.name == "forward"]
    assert fwd.counts.get("fused_add_layer_norm") == 1, str(fwd)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_transposed_weight_gradient_cast_fuses(poison, fallback):
    """Mixed-precision training with fp32 master weights: the weight gradient
    ``t(x^T @ dy)`` cast to fp32 is ``dy^T @ x`` with the cast in its epilogue (it was a
    GEMM, a transpose and a separate cast pass)."""
    lin = torch.nn.Linear(32, 48)
    x = torch.randn(4, 32, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    compiled = torch.compile(lin, backend=backend)
    with torch.autocast("cpu", dtype=torch.float16):
        y = compiled(x)
    with warnings.catch_warnings(), _common.count_launches() as launches:
        warnings.simplefilter("error", RuntimeWarning)  # (no fallback to unfused ATen)
        y.float().sum().backward()
    got = (x.grad, lin.weight.grad, lin.bias.grad)
    x.grad = lin.weight.grad = lin.bias.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        ref = lin(x)
    ref.float().sum().backward()
    for g, r in zip(got, (x.grad, lin.weight.grad, lin.bias.grad)):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=2e-3, rtol=2e-3)
    assert dict(launches) == {"mm_epilogue": 2}, dict(launches)
    backward = backend.report.graphs[-1]
    casts = [r for r in backward.replacements if r.scalars.get("expr") == '["to","ACC","float32"]']
    assert len(casts) == 2, str(backward)


@pytest.mark.parametrize("bias_shape", [(24,), (5, 24)])
def test_transposed_addmm_result_fuses_with_its_bias_as_a_column(poison, bias_shape):
    """``tanh(linear(a, w, bias).t())``: ``w @ a.t()`` plus the bias as a column (a full
    bias transposed), the tanh in the epilogue."""
    w, bias = torch.randn(24, 16), torch.randn(bias_shape)
    graph, launches = _run(
        lambda a: torch.tanh(torch.addmm(bias, a, w.t()).t()), torch.randn(5, 16)
    )
    assert dict(launches) == {"mm_epilogue": 1}, (dict(launches), str(graph))
    assert "aten.tanh" not in graph.code, graph.code


def test_producers_of_an_epilogue_input_are_computed_in_the_kernel(poison):
    """GPT-2's GELU backward reads ``3 * x ** 2`` of the saved ``x``, computed by its own
    ops: read only by the epilogue, those ops are computed in the GEMM's kernel from
    ``x`` (their result was written and read back); a producer read elsewhere too, or
    one that draws random numbers, stays an input."""
    w = torch.randn(16, 24)

    def fn(g, x, y):
        shared = y * 2.0  # also returned: written anyway
        return (g @ w) * (3.0 * torch.pow(x, 2.0)) + shared, shared

    g, x, y = torch.randn(5, 16), torch.randn(5, 24), torch.randn(5, 24)
    graph, launches = _run(fn, g, x, y)
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    assert "aten.pow" not in graph.code and graph.code.count("aten.mul") == 1, graph.code
    (fused,) = [r for r in graph.replacements if r.pattern == "fused_mm_epilogue"]
    assert "pow" in fused.scalars["expr"], fused


def test_producer_absorption_keeps_training_numbers(poison):
    """An MLP with GPT-2's written-out GELU, trained one step with each fallback: the
    backward's GELU-gradient epilogue computes ``x ** 2`` itself, and the gradients
    match eager's."""
    lin1, lin2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    leaves = [x, lin1.weight, lin1.bias, lin2.weight, lin2.bias]

    def fn(x):
        return lin2(gelu_tanh(lin1(x)))

    for fallback in ("eager", "inductor"):
        backend, _ = _train_step(fn, x, fallback=fallback)
        got = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        fn(x).float().square().sum().backward()
        for a, b in zip(got, (t.grad for t in leaves), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for t in leaves:
            t.grad = None
        (bwd,) = [g for g in backend.report.graphs if g.name == "backward"]
        assert "aten.pow" not in bwd.code, (fallback, bwd.code)


def test_open_region_falls_back_to_the_latest_nodes_ancestors(poison):
    """The whole open region has a branch the kernel cannot compute (a float64 cast,
    returned): the branch that feeds the latest node is fused on its own, and writes the
    GEMM result the other branch reads (before, nothing fused)."""
    w = torch.randn(16, 24)

    def fn(x):
        h = x @ w
        return h.double(), torch.tanh(h) * 2.0

    graph, launches = _run(fn, torch.randn(5, 16))
    assert dict(launches) == {"mm_epilogue_multi": 1}, dict(launches)
    assert "aten.tanh" not in graph.code, graph.code


def test_open_region_with_too_many_outputs_fuses_in_part(poison):
    """Six values of a GEMM's region are read outside it, one more than the kernel
    writes: the part that feeds the fifth is fused (it writes five), the last op runs
    on its own (before, nothing fused)."""
    w = torch.randn(16, 24)

    def fn(x):
        h = x @ w
        a = h * 2.0
        b = a + 1.0
        c = b * 3.0
        d = c - 1.0
        return h, a, b, c, d, torch.tanh(d)

    graph, launches = _run(fn, torch.randn(5, 16))
    assert dict(launches) == {"mm_epilogue_multi": 1}, dict(launches)
    (fused,) = [r for r in graph.replacements if r.pattern == "fused_mm_epilogue"]
    assert fused.scalars["extra_outputs"] == 4, fused
    assert "aten.tanh" in graph.code and "aten.sub" not in graph.code, graph.code
