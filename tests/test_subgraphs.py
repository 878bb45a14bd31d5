"""Graphs inside higher-order ops: a ``torch.cond`` branch, a
``torch.compiler.nested_compile_region`` body.  Their matmuls, norms and softmaxes get
the tile kernels as the graph's do, in inference and training, with both fallbacks;
with Inductor's, the anchors no pattern took are decomposed inside them too."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilebackend
from tilebackend.codegen import _common

FALLBACKS = ["eager", "inductor"]


def _block_parts():
    torch.manual_seed(0)
    return nn.Linear(8, 8), nn.LayerNorm(8)


def _run(fn, args, fallback, train):
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches, torch.set_grad_enabled(train):
        out = torch.compile(fn, backend=backend)(*args)
        if train:
            out.square().sum().backward()
    return out, dict(launches), backend.report


@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("taken", [True, False], ids=["true_branch", "false_branch"])
def test_cond_branches_run_tile_kernels(poison, fallback, taken):
    lin, ln = _block_parts()

    def fn(x, p):
        return torch.cond(
            p.sum() > 0,
            lambda x: ln(F.gelu(lin(x)) + x),
            lambda x: torch.softmax(lin(x) * 0.5, -1),
            (x,),
        )

    x = torch.randn(4, 8, requires_grad=True)
    p = torch.tensor(1.0 if taken else -1.0)
    out, launches, report = _run(fn, (x, p), fallback, train=True)
    got = x.grad.clone()
    x.grad = None
    ref = fn(x, p)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)
    assert report.counts.get("fused_add_layer_norm", 0) >= 1, str(report)
    assert report.counts.get("fused_scale_mask_softmax", 0) >= 1, str(report)
    # (cond's backward recomputes the taken branch's forward: its kernels run again)
    if taken:
        assert launches["add_layer_norm_fwd"] >= 1 and launches["layer_norm_bwd"] >= 1
        assert "scale_mask_softmax_fwd" not in launches, launches
    else:
        assert launches["scale_mask_softmax_fwd"] >= 1, launches
        assert launches["scale_mask_softmax_bwd"] == 1, launches
        assert "add_layer_norm_fwd" not in launches, launches


@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_nested_compile_region_body_is_rewritten_once_and_runs_each_call(poison, fallback, train):
    """A region called twice is one subgraph: rewritten once, its kernels launched per
    call.  (In inference with Inductor's fallback its undecomposed layer norm used to
    fail Inductor's lowering.)"""
    lin, ln = _block_parts()

    @torch.compiler.nested_compile_region
    def block(x):
        return ln(F.gelu(lin(x)) + x)

    def fn(x):
        return torch.softmax(block(block(x)) * 0.3, -1)

    x = torch.randn(4, 8, requires_grad=train)
    out, launches, report = _run(fn, (x,), fallback, train)
    with torch.set_grad_enabled(train):
        ref = fn(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert launches["add_layer_norm_fwd"] == 2, launches  # the body's, once per call
    assert launches["scale_mask_softmax_fwd"] == 1, launches
    forward = report.graphs[-2] if train else report.graphs[-1]
    assert forward.counts["fused_add_layer_norm"] == 1, str(report)  # (one body)
    if train:
        got = x.grad.clone()
        x.grad = None
        ref.square().sum().backward()
        torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)
        assert launches["layer_norm_bwd"] == 2, launches


def test_a_subgraph_rewrite_leaves_the_original_graph_as_it_was():
    """The rewrite works on a copy, subgraphs included: when it is thrown away (a
    failure), the graph that runs is the one AOTAutograd gave."""
    from tilebackend.backend import _copy_gm, _graph_modules

    lin, ln = _block_parts()

    def fn(x, p):
        return torch.cond(p.sum() > 0, lambda x: ln(x), lambda x: lin(x), (x,))

    graphs = []

    def grab(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=grab)(torch.randn(4, 8), torch.tensor(1.0))
    (gm,) = graphs
    copy = _copy_gm(gm)
    subs = _graph_modules(copy)[:-1]
    assert len(subs) == 2 and all(s not in list(gm.modules()) for s in subs)

    def graphs_of(m):
        return [str(g.graph) for g in m.modules() if isinstance(g, torch.fx.GraphModule)]

    before = graphs_of(gm)
    for s in subs:  # what a rewrite does: new nodes
        x = next(n for n in s.graph.nodes if n.op == "placeholder")
        with s.graph.inserting_after(x):
            s.graph.call_function(torch.ops.aten.neg.default, (x,))
    assert graphs_of(gm) == before and graphs_of(copy) != before
