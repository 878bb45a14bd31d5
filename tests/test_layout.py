"""Replacements keep the memory layout the graph was traced with.

Eager's pointwise ops give their result their input's layout; the tile kernels write
contiguous results.  A later ``aten.view`` traced for the old strides failed ("view size
is not compatible with input tensor's size and stride") with the eager fallback: HF
Gemma3's q/k norms over ``q.view(B, T, H, D).transpose(1, 2)`` crashed the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_tile, inference_like_eager

from tilebackend.codegen import _common
from tilebackend.models import TinyTransformer

B, T, H, D = 2, 7, 4, 8


def _gemma_rms(x, w):  # HF Gemma3RMSNorm, written out
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return (out * (1.0 + w.float())).type_as(x)


def _qk_norm(q, w):
    q = _gemma_rms(q.view(B, T, H, D).transpose(1, 2), w)  # [B, H, T, D], memory [B, T, H, D]
    return q.transpose(1, 2).reshape(B, T, H * D)  # traced as a view


def _gemm_times_transposed(t, x, w):
    y = t.view(B, T, H, D).transpose(1, 2) * F.linear(x, w)  # eager: t's memory order
    return y.transpose(1, 2).reshape(B, T, -1)


def _norm_times_transposed(t, x):
    y = t.view(B, T, H, D).transpose(1, 2) * F.layer_norm(x, (D,))
    return y.transpose(1, 2).reshape(B, T, -1)


CASES = {
    "written_rms_norm": (_qk_norm, lambda: (torch.randn(B, T, H * D), torch.randn(D) * 0.1)),
    "gemm_epilogue": (
        _gemm_times_transposed,
        lambda: (torch.randn(B, T, H * D), torch.randn(B, H, T, 16), torch.randn(D, 16)),
    ),
    "norm_epilogue": (
        _norm_times_transposed,
        lambda: (torch.randn(B, T, H * D), torch.randn(B, H, T, D)),
    ),
}
KERNELS = {
    "written_rms_norm": "rms_norm_fwd",
    "gemm_epilogue": "mm_epilogue",
    "norm_epilogue": "norm_epilogue",
}


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_view_after_a_replaced_value_sees_the_traced_layout(poison, case, fallback):
    fn, make = CASES[case]
    args = make()
    backend, launches = inference_like_eager(fn, *args, options={"fallback": fallback})
    assert launches[KERNELS[case]] == 1, dict(launches)
    notes = [n for g in backend.report.graphs for n in g.notes]
    assert any("traced layout" in n for n in notes), str(backend.report)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_a_transformer_step_needs_no_layout_copy(poison, fallback):
    """The common case costs nothing: contiguous results replace contiguous values."""
    model = TinyTransformer(vocab=64, dim=32, heads=2, layers=1)
    ids = torch.randint(0, 64, (2, 9))
    compiled, backend = compile_tile(model, {"fallback": fallback})
    with _common.count_launches() as launches:
        compiled(ids).float().square().sum().backward()
    notes = [n for g in backend.report.graphs for n in g.notes]
    assert not any("traced layout" in n for n in notes), notes
    assert backend.report.counts, str(backend.report)
    assert launches["layer_norm_bwd"] >= 1 and launches["log_softmax_fwd"] == 1, dict(launches)


def test_a_layout_copy_does_not_stop_the_epilogue(poison):
    """The rewrite's layout copy of a transposed norm used to sit between the norm and
    its pointwise readers, so the norm epilogue never grew over them (HF Gemma3's q/k
    norms before RoPE).  The fusion takes the copy out, fuses, and copies once, after."""

    def fn(q, w):
        q = _gemma_rms(q.view(B, T, H, D).transpose(1, 2), w) * 2.0
        return q.transpose(1, 2).reshape(B, T, H * D)

    args = (torch.randn(B, T, H * D), torch.randn(D) * 0.1)
    backend, launches = inference_like_eager(fn, *args)
    assert dict(launches) == {"norm_epilogue": 1}, (dict(launches), str(backend.report))
    (graph,) = backend.report.graphs
    assert sum("traced layout" in n for n in graph.notes) == 1, graph.notes
    assert graph.code.count("aten.clone") == 1, graph.code
