"""Epilogue extras that broadcast over some rows of a linear's N-d output but not over its
GEMM's folded ``[M, N]``: DiT's adaLN gate ``x + gate[:, None] * proj(h)`` (``[B, 1, N]``),
a position table ``[T, N]`` added after a projection.  The fused op then takes the N-d
input the linear viewed as ``[M, K]``, and the kernel reads such an extra through its row
strides; before, the report said the extra "is not 2-D" and the epilogue ran as ATen ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_tile, grads_like_eager, inference_like_eager

from tilebackend.codegen import _common

LEFTOVER = ("aten.mul.Tensor", "aten.add.Tensor", "aten.relu", "aten.gelu")


def _gate(lin):  # DiT's gated residual: the gate is per sample, the residual per row
    return lambda x, gate: x + gate.unsqueeze(1) * lin(x)


def _gate_gelu(lin):  # the gate over a GELU MLP's output, 4-D tokens (video / windows)
    return lambda x, gate: x + gate[:, None, None] * F.gelu(lin(x), approximate="tanh")


def _pos(lin, table):  # a learned position table added after a projection
    return lambda x, gate: torch.relu(lin(x) + table[: x.shape[1]]) * gate[:, None]


CASES = {
    "gate": (_gate, (2, 5, 16)),
    "gate_gelu_4d": (_gate_gelu, (2, 3, 5, 16)),
    "position_table": (_pos, (3, 7, 16)),
}


def _make(case, dtype=torch.float32):
    make, x_shape = CASES[case]
    lin = torch.nn.Linear(16, 16).to(dtype)
    table = torch.randn(7, 16, dtype=dtype)
    fn = make(lin, table) if case == "position_table" else make(lin)
    x = torch.randn(x_shape, dtype=dtype)
    gate = torch.randn(x_shape[0], 16, dtype=dtype)
    return fn, x, gate, lin


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
)
def test_per_row_extra_is_one_epilogue_kernel(poison, case, dtype, atol, rtol):
    fn, x, gate, _ = _make(case, dtype)
    backend, launches = inference_like_eager(fn, x, gate, atol=atol, rtol=rtol)
    assert dict(launches) == {"mm_epilogue": 1}, (dict(launches), str(backend.report))
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_mm_epilogue") == 1, str(graph)
    for op in LEFTOVER:
        assert op not in graph.code, (op, graph.code)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_per_row_extra_in_training(poison, fallback):
    """adaLN: the input modulated per sample, the output gated per sample.  The forward
    writes the sum and the GEMM result the gate's gradient needs in one kernel; in the
    backward, the input gradient ``(g @ W) * (1 + scale[:, None])`` is a per-row
    epilogue too (with the Inductor fallback's partitioner, ``1 + scale`` is recomputed
    after a use of the GEMM result, and moves up)."""
    lin = torch.nn.Linear(16, 16)

    def fn(x, gate, scale):
        return x + gate.unsqueeze(1) * lin(x * (1 + scale.unsqueeze(1)))

    x, gate, scale = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)
    leaves = [t.requires_grad_(True) for t in (x, gate, scale)] + [lin.weight, lin.bias]
    compiled, backend = compile_tile(fn, {"fallback": fallback})
    with _common.count_launches() as launches:
        compiled(x, gate, scale).square().sum().backward()
    grads_like_eager(leaves, lambda: fn(x, gate, scale), 1e-4, 1e-4)
    # forward and backward: each writes its sum and the GEMM result a reduction reads
    assert dict(launches) == {"mm_epilogue_multi": 2, "mm": 1}, dict(launches)
    per_row = [
        r
        for r in backend.report.graphs[-1].replacements
        if r.pattern == "fused_mm_epilogue" and r.inputs["a"] == "float32[2, 5, 16]"
    ]
    assert per_row, str(backend.report.graphs[-1])


def test_per_row_extra_with_dynamic_shapes(poison):
    """Symbolic batch and tokens: one compile serves both sizes, fused both times."""
    fn, _, _, _ = _make("position_table")
    compiled, backend = compile_tile(fn, dynamic=True)
    for b, t in ((2, 5), (3, 7)):
        x, gate = torch.randn(b, t, 16), torch.randn(b, 16)
        with torch.no_grad(), _common.count_launches() as launches:
            out = compiled(x, gate)
        torch.testing.assert_close(out, fn(x, gate), atol=1e-5, rtol=1e-5)
        assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    (graph,) = backend.report.graphs
    assert graph.counts.get("fused_mm_epilogue") == 1, str(graph)


def test_per_row_extra_of_a_gemm_on_a_2d_input_says_why(poison):
    """An N-d output that is a 2-D GEMM's result viewed afterwards has no N-d input to
    hand the kernel: the epilogue stays ATen ops, and the report says why."""
    w, gate = torch.randn(16, 16), torch.randn(2, 16)

    def fn(x2, gate):
        return (x2 @ w).view(2, 5, 16) * gate[:, None]

    compiled, backend = compile_tile(fn)
    x2 = torch.randn(10, 16)
    with torch.no_grad(), _common.count_launches() as launches:
        out = compiled(x2, gate)
    torch.testing.assert_close(out, fn(x2, gate), atol=1e-5, rtol=1e-5)
    assert dict(launches) == {"mm": 1}, dict(launches)
    (note,) = [s for s in backend.report.skipped if s.pattern == "fusion"]
    assert "needs the N-d output" in note.reason, note.reason
