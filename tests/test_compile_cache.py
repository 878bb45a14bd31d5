"""Warm compiles served by AOTAutograd's cache (Inductor fallback): a hit runs the tile
kernels and puts the rewrite's report back; anything the rewrite depends on changes the
key; graphs the key cannot describe are never cached."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import grads_like_eager
from torch._dynamo.utils import counters

import tilebackend
from tilebackend import compile_cache, settings
from tilebackend.codegen import _common
from tilebackend.fx_passes.registry import REGISTRY


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """A fresh Inductor cache dir (AOTAutograd's and the FX graph cache live there)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path / "inductor"


def _compile_run(fn, *args, options=None, backward=False):
    """Compile ``fn`` afresh with the Inductor fallback and run it; returns the output,
    the backend, the launches and the AOTAutograd cache counters of that compile."""
    torch._dynamo.reset()
    counters.clear()
    backend = tilebackend.TileBackend(options={"fallback": "inductor", **(options or {})})
    with _common.count_launches() as n:
        out = torch.compile(fn, backend=backend)(*args)
        if backward:
            out.square().sum().backward()
    return out, backend, dict(n), dict(counters["aot_autograd"])


def _softmax_ln(x, w, b):
    return torch.softmax(torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b) * 0.5, -1)


def _inputs(requires_grad=False):
    x = torch.randn(5, 37)
    w, b = torch.randn(37), torch.randn(37)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


def test_warm_compile_is_a_cache_hit_that_runs_the_kernels_and_keeps_the_report(
    poison, inductor_cache
):
    args = _inputs()
    out1, b1, n1, c1 = _compile_run(_softmax_ln, *args)
    assert c1.get("autograd_cache_miss") == 1 and c1.get("autograd_cache_saved") == 1, c1
    out2, b2, n2, c2 = _compile_run(_softmax_ln, *args)
    assert c2.get("autograd_cache_hit") == 1, c2
    assert n2 == n1 and n1["layer_norm_fwd"] == 1 and n1["scale_mask_softmax_fwd"] == 1, n1
    torch.testing.assert_close(out2, _softmax_ln(*args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out1)
    assert str(b2.report) == str(b1.report)
    assert b2.report.counts == {"layer_norm": 1, "softmax": 1, "fused_scale_mask_softmax": 1}


def test_training_warm_compile_hit_runs_the_backward_kernels(poison, inductor_cache):
    args = _inputs(requires_grad=True)
    _, _, n1, c1 = _compile_run(_softmax_ln, *args, backward=True)
    grads1 = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    out, _, n2, c2 = _compile_run(_softmax_ln, *args, backward=True)
    assert c1.get("autograd_cache_saved") == 1 and c2.get("autograd_cache_hit") == 1, (c1, c2)
    assert n2 == n1 and n2["layer_norm_bwd"] == 1, n2
    for t, g1 in zip(args, grads1, strict=True):
        torch.testing.assert_close(t.grad, g1)
    grads_like_eager(args, lambda: _softmax_ln(*args), atol=1e-4, rtol=1e-4)


def test_changed_settings_miss_the_cache(poison, inductor_cache):
    """A compile-time setting is in the key: a graph cached with the softmax pattern on
    is not served to a backend that disabled it."""
    args = _inputs()
    _, _, n1, _ = _compile_run(_softmax_ln, *args)
    assert n1.get("scale_mask_softmax_fwd") == 1
    out, backend, n2, c2 = _compile_run(_softmax_ln, *args, options={"disable": ("softmax",)})
    assert c2.get("autograd_cache_hit") is None and c2.get("autograd_cache_miss") == 1, c2
    # (without the softmax pattern, the scale is the norm's epilogue)
    assert "scale_mask_softmax_fwd" not in n2 and n2["norm_epilogue"] == 1, n2
    assert "softmax" not in backend.report.counts
    torch.testing.assert_close(out, _softmax_ln(*args), atol=1e-5, rtol=1e-5)


def test_compile_cache_off_never_hits(poison, inductor_cache):
    args = _inputs()
    for _ in range(2):
        _, _, n, c = _compile_run(_softmax_ln, *args, options={"compile_cache": False})
        assert not c.get("autograd_cache_hit") and not c.get("autograd_cache_saved"), c
        assert n["layer_norm_fwd"] == 1


def test_missing_or_corrupt_stored_report(poison, inductor_cache):
    """The kernels still run; the report says where the graph came from (and a corrupt
    file gives one warning)."""
    args = _inputs()
    _compile_run(_softmax_ln, *args)
    (stored,) = (inductor_cache / "tilebackend_reports").glob("*.json")
    stored.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable stored report"):
        _, backend, n, c = _compile_run(_softmax_ln, *args)
    assert c.get("autograd_cache_hit") == 1 and n["layer_norm_fwd"] == 1
    (graph,) = backend.report.graphs
    assert "report of its rewrite was not found" in graph.notes[0]
    stored.unlink()
    _, backend, _, c = _compile_run(_softmax_ln, *args)
    assert c.get("autograd_cache_hit") == 1
    assert "report of its rewrite was not found" in backend.report.graphs[0].notes[0]


def test_what_is_never_cached():
    builtins = REGISTRY.active((), ())
    s = settings.Settings()
    assert compile_cache.tag(s, "default", "inductor", builtins, training=False)
    for reason, tag in {
        "compile_cache=False": compile_cache.tag(
            s.with_options({"compile_cache": False}), "default", "inductor", builtins, False
        ),
        "verify": compile_cache.tag(
            s.with_options({"verify": True}), "default", "inductor", builtins, False
        ),
        # a training graph's cached backward would run outside this backend's scope
        "runtime settings": compile_cache.tag(
            s.with_options({"autotune": "off"}), "default", "inductor", builtins, True
        ),
    }.items():
        assert tag is None, reason
    # inference has no backward: its run-time settings reach the kernels as usual
    assert compile_cache.tag(
        s.with_options({"autotune": "off"}), "default", "inductor", builtins, False
    )
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            lambda x: torch.sigmoid(x) * 3,
            replacement=lambda x: torch.sigmoid(x) * 3,
            example_inputs=[("f", (4, 8))],
            name="user_sigmoid3",
        )
        with_user = REGISTRY.active((), ())
        assert compile_cache.tag(s, "default", "inductor", with_user, False) is None


def test_tag_depends_on_settings_mode_and_patterns():
    builtins = REGISTRY.active((), ())
    s = settings.Settings()
    base = compile_cache.tag(s, "default", "inductor", builtins, False)
    others = {
        compile_cache.tag(s.with_options({"fusion": False}), "default", "inductor", builtins, 0),
        compile_cache.tag(s, "max-autotune", "inductor", builtins, False),
        compile_cache.tag(s, "default", "inductor", builtins[1:], False),
    }
    assert base not in others and len(others) == 3


_FRESH_PROCESS = textwrap.dedent(
    """
    import torch, tilebackend
    from torch._dynamo.utils import counters
    from tilebackend.codegen import _common
    fn = lambda x: torch.softmax(x * 0.25, -1)
    x = torch.randn(6, 41)
    backend = tilebackend.TileBackend(options={"fallback": "inductor"})
    with _common.count_launches() as n:
        out = torch.compile(fn, backend=backend)(x)
    torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
    print(dict(counters["aot_autograd"]), dict(n), backend.report.counts)
    """
)


_FRESH_TRAINING = textwrap.dedent(
    """
    import torch, tilebackend
    from torch._dynamo.utils import counters
    from tilebackend.codegen import _common
    traced = []
    real = tilebackend.TileBackend._trace_and_rewrite
    def counted(self, *args, **kwargs):
        traced.append(1)
        return real(self, *args, **kwargs)
    tilebackend.TileBackend._trace_and_rewrite = counted
    ln = torch.nn.LayerNorm(37)
    fn = lambda x: torch.softmax(ln(x) * 0.25, -1)
    x = torch.randn(6, 37, requires_grad=True)
    backend = tilebackend.TileBackend(options={"fallback": "inductor"})
    with _common.count_launches() as n:
        torch.compile(fn, backend=backend)(x).square().sum().backward()
    got = [t.grad.clone() for t in (x, ln.weight)]
    x.grad = ln.weight.grad = None
    fn(x).square().sum().backward()
    for g, t in zip(got, (x, ln.weight)):
        torch.testing.assert_close(g, t.grad, atol=1e-4, rtol=1e-4)
    print(len(traced), dict(counters["aot_autograd"]), dict(n))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("script", [_FRESH_PROCESS, _FRESH_TRAINING], ids=["infer", "train"])
def test_hit_in_a_fresh_process_runs_the_kernels(device, tmp_path, script):
    """A hit in a new process: the graph calls the kernels' dispatch-light twins,
    which only our rewrite used to define (it does not run on a hit); a training hit
    takes the rewritten graph from its stored form instead of tracing."""
    if device != "cpu":
        pytest.skip("runs the interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    outs = []
    for _ in range(2):
        res = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(res.stdout.strip().splitlines()[-1])
    assert "'autograd_cache_saved': 1" in outs[0], outs
    assert "'autograd_cache_hit': 1" in outs[1], outs
    if script is _FRESH_PROCESS:
        for out in outs:
            assert "{'scale_mask_softmax_fwd': 1}" in out, outs
            assert "'fused_scale_mask_softmax': 1" in out, outs
    else:
        assert outs[0].startswith("1 ") and outs[1].startswith("0 "), outs
        for out in outs:
            assert "'layer_norm_bwd': 1" in out and "'scale_mask_softmax_bwd': 1" in out, outs


def _compile_dynamic_afresh(fn):
    """Dynamo and its counters reset; ``fn`` compiled with ``dynamic=True`` on the
    Inductor fallback.  Returns the backend and the compiled function."""
    torch._dynamo.reset()
    counters.clear()
    backend = tilebackend.TileBackend(options={"fallback": "inductor"})
    return backend, torch.compile(fn, backend=backend, dynamic=True)


def test_dynamic_shapes_hit_serves_every_size(poison, inductor_cache):
    """``dynamic=True``: the cached graph is symbolic and guarded like Inductor's own;
    the hit runs the kernels at sizes the first compile never saw."""
    ln = torch.nn.LayerNorm(37)

    def fn(x):
        return torch.softmax(ln(x) * 0.5, -1)

    for round_ in range(2):
        backend, compiled = _compile_dynamic_afresh(fn)
        for rows in (5, 11) if round_ == 0 else (3, 17):
            x = torch.randn(rows, 37)
            with torch.no_grad(), _common.count_launches() as n:
                out = compiled(x)
            torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
            assert dict(n) == {"layer_norm_fwd": 1, "scale_mask_softmax_fwd": 1}, dict(n)
        assert len(backend.report.graphs) == 1 and backend.report.graphs[0].symbolic
        if round_:
            assert counters["aot_autograd"]["autograd_cache_hit"] == 1, dict(
                counters["aot_autograd"]
            )


# --- training: the graph rewritten before autograd is stored too --------------------


@pytest.fixture
def traces(monkeypatch):
    """How many times the pre-autograd trace ran."""
    calls = []
    real = tilebackend.TileBackend._trace_and_rewrite

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tilebackend.TileBackend, "_trace_and_rewrite", counted)
    return calls


def test_training_warm_compile_skips_the_pre_autograd_trace(poison, inductor_cache, traces):
    args = _inputs(requires_grad=True)
    _, b1, n1, c1 = _compile_run(_softmax_ln, *args, backward=True)
    assert len(traces) == 1 and c1.get("autograd_cache_saved") == 1, (traces, c1)
    assert len(list((inductor_cache / "tilebackend_graphs").glob("*.json"))) == 1
    for t in args:
        t.grad = None
    _, b2, n2, c2 = _compile_run(_softmax_ln, *args, backward=True)
    assert len(traces) == 1, "the warm compile traced again"
    assert c2.get("autograd_cache_hit") == 1, c2
    assert n2 == n1 and n2["layer_norm_bwd"] == 1 and n2["layer_norm_fwd"] == 1, n2
    assert str(b2.report) == str(b1.report)
    assert b2.report.graphs[0].name == "forward, before autograd"
    assert b2.report.graphs[0].replacements
    grads_like_eager(args, lambda: _softmax_ln(*args), atol=1e-4, rtol=1e-4)


def test_training_graph_with_nothing_to_rewrite_is_not_traced_again(inductor_cache, traces):
    args = [torch.randn(4, 9, requires_grad=True)]

    def fn(x):
        return (x.sin() * 2).cos()

    for _ in range(2):
        args[0].grad = None
        _, backend, _, _ = _compile_run(fn, *args, backward=True)
        assert not backend.report.counts
    assert len(traces) == 1
    grads_like_eager(args, lambda: fn(*args), atol=1e-5, rtol=1e-5)


def _dynamo_graph(fn, *args):
    """The graph and inputs Dynamo hands a backend for ``fn(*args)``."""
    seen = []

    def grab(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=grab)(*args)
    ((gm, inputs),) = seen
    return gm, inputs


@torch._dynamo.allow_in_graph
def _users_function(x):
    return x * 2


def test_pre_autograd_key_covers_what_the_trace_reads():
    tag = "tile-test"

    def fn(t):
        return torch.softmax(t * 0.5, -1)

    def key_of(x, tag=tag):
        return compile_cache.pre_autograd_key(tag, *_dynamo_graph(fn, x))

    x = torch.randn(4, 8, requires_grad=True)
    key = key_of(x)
    assert key and key == key_of(torch.randn(4, 8, requires_grad=True))
    others = {
        key_of(x, tag="tile-other"),
        key_of(x.detach().double().requires_grad_()),
        key_of(x.detach()),  # requires_grad
        key_of(torch.randn(8, 4).t().requires_grad_()),  # strides
        key_of(torch.randn(4, 9, requires_grad=True)),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        others.add(key_of(x))
    with torch.no_grad():
        others.add(key_of(x))
    assert key not in others and len(others) == 7


def test_pre_autograd_key_refuses_what_the_code_does_not_spell_out():
    x, y = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    gm, inputs = _dynamo_graph(lambda a: torch.softmax(_users_function(a), -1), x)
    assert any(n.target is _users_function for n in gm.graph.nodes)
    assert compile_cache.pre_autograd_key("t", gm, inputs) is None
    gm, inputs = _dynamo_graph(lambda a, b: a + b, x, y)
    assert compile_cache.pre_autograd_key("t", gm, inputs)
    base = torch.randn(4, 16)
    aliased = [base[:, :8].requires_grad_(), base[:, 8:]]
    assert compile_cache.pre_autograd_key("t", gm, aliased) is None


def test_corrupt_stored_training_graph_is_traced_afresh(poison, inductor_cache, traces):
    args = _inputs(requires_grad=True)
    _compile_run(_softmax_ln, *args, backward=True)
    (stored,) = (inductor_cache / "tilebackend_graphs").glob("*.json")
    stored.write_bytes(stored.read_bytes()[:100])
    for t in args:
        t.grad = None
    with pytest.warns(RuntimeWarning, match="unreadable stored graph"):
        _, backend, n, _ = _compile_run(_softmax_ln, *args, backward=True)
    assert len(traces) == 2 and n["layer_norm_bwd"] == 1, (traces, n)
    assert backend.report.graphs[0].replacements
    grads_like_eager(args, lambda: _softmax_ln(*args), atol=1e-4, rtol=1e-4)


def test_dynamic_training_hit_serves_every_size(poison, inductor_cache, traces):
    """``dynamic=True`` training: the stored graph is symbolic; the warm compile takes
    it without tracing (the trace added no guards), AOTAutograd's entry matches the
    backward's shape guards, and both are right at new sizes."""
    w, b = torch.randn(37, requires_grad=True), torch.randn(37, requires_grad=True)

    def fn(x):
        return torch.softmax(torch.nn.functional.layer_norm(x, (37,), w, b) * 0.5, -1)

    for round_ in range(2):
        backend, compiled = _compile_dynamic_afresh(fn)
        for rows in (5, 11) if round_ == 0 else (3, 17):
            x = torch.randn(rows, 37, requires_grad=True)
            w.grad = b.grad = None
            with _common.count_launches() as n:
                compiled(x).square().sum().backward()
            assert n["layer_norm_fwd"] == 1 and n["layer_norm_bwd"] == 1, dict(n)
            grads_like_eager([x, w, b], lambda: fn(x), atol=1e-4, rtol=1e-4)
        assert backend.report.graphs[0].symbolic and backend.report.graphs[0].replacements
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        assert hits == round_, dict(counters["aot_autograd"])
        # the forward's report comes back with the hit, at a first size other than the
        # cold compile's (its key read that first call's sizes: "report not found")
        (fwd,) = [g for g in backend.report.graphs if g.name == "forward"]
        assert fwd.replacements and not fwd.notes, str(backend.report)
    assert len(traces) == 1


def test_stored_training_graph_keeps_random_calls_random(inductor_cache, traces):
    """A call whose arguments are all constants (``randn([4, 4])``) stays a call in the
    stored graph, cold and warm: rebuilding a graph never runs it into a constant."""
    lin = torch.nn.Linear(4, 4)

    def fn(x):
        noisy = lin(x) + torch.randn(4, 4)
        return torch.softmax(torch.nn.functional.layer_norm(noisy, (4,)), -1)

    x = torch.randn(4, 4, requires_grad=True)
    for _ in range(2):
        torch._dynamo.reset()
        backend = tilebackend.TileBackend(options={"fallback": "inductor"})
        compiled = torch.compile(fn, backend=backend)
        with _common.count_launches() as n:
            first, second = compiled(x), compiled(x)
        assert sum(n.values()) >= 4, dict(n)  # (the GEMM and the norm, twice)
        assert not torch.equal(first, second)
    assert len(traces) == 1


def test_graph_serialization_round_trip_and_refusals():
    from tilebackend.fx_passes import serialize

    g = torch.fx.Graph()
    x, n = g.placeholder("x"), g.placeholder("n")
    aten = torch.ops.aten
    y = g.call_function(aten.full.default, ([2, n], float("-inf")), {"dtype": torch.float16})
    z = g.call_function(
        aten._to_copy.default, (x,), {"dtype": torch.float16, "layout": torch.strided}
    )
    g.output((g.call_function(aten.add.Tensor, (z, y)), g.call_function(operator.mul, (n, 2))))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    data = serialize.dump(gm)
    back = serialize.load(json.loads(json.dumps(data)))
    assert back.code == gm.code
    t = torch.randn(2, 3)
    for a, b in zip(back(t, 3), gm(t, 3)):
        torch.testing.assert_close(a, b)
    gm.register_buffer("w", torch.ones(1))
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        gm.graph.get_attr("w")
    with pytest.raises(serialize.Unserializable, match="get_attr"):
        serialize.dump(gm)
    for bad in (
        {"op": "os.system"},  # not an op name torch.ops resolves
        {"fn": "builtins.exec"},  # not on the list of plain functions
    ):
        nodes = [dict(n) for n in data["nodes"]]
        nodes[1] = {**nodes[1], "op": "call_function", "target": bad}
        with pytest.raises((ValueError, KeyError, AttributeError)):
            serialize.load({"nodes": nodes})


def test_a_retained_backward_is_not_served_a_backward_that_overwrites_saved_tensors(
    poison, inductor_cache
):
    """Inductor's FX graph cache keys a backward without its donated buffers.  A normal
    run's backward may overwrite saved tensors in place (here the GELU's saved GEMM
    output); a later lazy backward under ``retain_graph=True`` is compiled without
    donation, and served that cached code, a second pass read clobbered values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8), torch.nn.LayerNorm(8)
    )
    x = torch.randn(4, 8, requires_grad=True)

    def grad(fn, retain):
        x.grad = None
        y = fn(x)
        if retain:
            y.sum().backward(retain_graph=True)
            x.grad = None
        y.square().sum().backward()
        return x.grad.clone()

    def compiled():
        torch._dynamo.reset()
        opts = {"fallback": "inductor", "compile_cache": False}  # (AOTAutograd's cache off)
        return torch.compile(model, backend=tilebackend.TileBackend(options=opts))

    expect = grad(model, False)
    torch.testing.assert_close(grad(compiled(), False), expect, atol=1e-6, rtol=1e-5)
    counters.clear()
    with _common.count_launches() as n:
        got = grad(compiled(), True)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1  # (the forward's: the cache is on)
    assert n["layer_norm_bwd"] == 2, dict(n)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
