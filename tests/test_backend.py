"""End to end through torch.compile(backend="tile"): numbers, and the path taken."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_tile, grads_like_eager

import tilebackend
from tilebackend.codegen import _common
from tilebackend.models import Block, RMSNorm, TinyTransformer

EAGER = {"fallback": "eager"}


def run_checked(fn, *args, options=EAGER, expect=(), atol=1e-5, rtol=1e-5, **kw):
    """Compile ``fn``, run it, compare with eager, and assert the tile kernels in
    ``expect`` actually launched.  Returns (report, launches)."""
    compiled, backend = compile_tile(fn, options, **kw)
    ref = fn(*args)
    with _common.count_launches() as launches:
        out = compiled(*args)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for k in expect:
        assert launches[k] >= 1, f"tile kernel {k!r} did not run: {dict(launches)}"
    return backend.report, launches


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_any_dim(poison, dim):
    x = torch.randn(5, 7, 11)
    report, _ = run_checked(
        lambda x: torch.softmax(x * 0.5, dim),
        x,
        options={"fallback": "eager", "fusion": False},
        expect=["softmax_fwd"],
    )
    assert report.counts == {"softmax": 1}


def test_log_softmax_and_layer_norm(poison):
    ln = torch.nn.LayerNorm(13)
    x = torch.randn(3, 5, 13)
    fn = lambda x: torch.log_softmax(ln(x), -1)  # noqa: E731
    report, _ = run_checked(fn, x, expect=["log_softmax_fwd", "layer_norm_fwd"])
    assert report.counts == {"log_softmax": 1, "layer_norm": 1}


@pytest.mark.parametrize("style", ["functional", "llama"])
def test_rms_norm_written_out(poison, style):
    w = torch.randn(24)
    x = torch.randn(2, 3, 24)
    if style == "functional":
        fn = lambda x: F.rms_norm(x, (24,), w, 1e-6)  # noqa: E731
        name = "rms_norm"
    else:
        mod = RMSNorm(24)
        with torch.no_grad():
            mod.weight.copy_(w)
        fn, name = mod, "rms_norm_llama"
    report, _ = run_checked(fn, x, expect=["rms_norm_fwd"], atol=1e-5, rtol=1e-5)
    assert report.counts == {name: 1}, str(report)


class _T5LayerNorm(torch.nn.Module):
    """As HF's T5LayerNorm: fp32 variance, the input times the fp32 rsqrt, cast to the
    weight's (half) dtype, then weighted."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.variance_epsilon = 1e-6

    def forward(self, h):
        var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


@pytest.mark.parametrize(
    "dtype, name, tol",
    [
        (torch.float32, "rms_norm_llama", 1e-5),  # (in fp32 it is Llama's)
        (torch.float16, "rms_norm_t5", 2e-3),
        (torch.bfloat16, "rms_norm_t5", 1.6e-2),
    ],
)
def test_t5_layer_norm_in_half_precision(poison, dtype, name, tol):
    """T5's RMS norm in fp16/bf16 is one rms_norm kernel, forward and backward (it was
    left to the fallback, with no reason in the report)."""
    mod = _T5LayerNorm(40).to(dtype)
    x = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with _common.count_launches() as launches:
        out = torch.compile(mod, backend=backend)(x)
        out.float().square().sum().backward()
    got_out, got_gx, got_gw = out.detach(), x.grad, mod.weight.grad
    x.grad = mod.weight.grad = None
    ref = mod(x)
    ref.float().square().sum().backward()
    torch.testing.assert_close(got_out, ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_gx, x.grad, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(got_gw, mod.weight.grad, atol=tol * 8, rtol=tol * 8)
    assert launches["rms_norm_fwd"] == 1 and launches["rms_norm_bwd"] == 1, dict(launches)
    assert backend.report.counts.get(name) == 1, str(backend.report)


def test_training_code_without_a_source_file(poison):
    """Code with no source file (``exec``'d or generated) has no stack traces: the rewrite
    must not give its nodes a None one, which AOT's backward tracing cannot join."""
    ns = {"torch": torch}
    exec("def f(x):\n    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)", ns)
    x = torch.randn(4, 8, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with _common.count_launches() as launches:
        torch.compile(ns["f"], backend=backend)(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    ns["f"](x).sum().backward()
    torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)
    assert launches["rms_norm_fwd"] == 1 and launches["rms_norm_bwd"] == 1, dict(launches)


def test_linear_nd_and_matmuls(poison):
    lin = torch.nn.Linear(11, 7)
    x = torch.randn(2, 3, 11)
    a, b = torch.randn(3, 5, 6), torch.randn(3, 6, 4)
    bias = torch.randn(3, 5, 4)

    def fn(x, a, b, bias):
        return lin(x).sum() + torch.baddbmm(bias, a, b, beta=0.5, alpha=2.0).sum() + (a @ b).sum()

    report, _ = run_checked(fn, x, a, b, bias, expect=["addmm", "bmm", "baddbmm"], atol=1e-4)
    assert report.counts.get("addmm") == 1 and report.counts.get("baddbmm") == 1
    assert report.counts.get("bmm") == 1


def test_unsupported_dtype_is_left_with_reason():
    x = torch.randn(4, 9, dtype=torch.float64)
    report, launches = run_checked(lambda x: torch.softmax(x, -1), x)
    assert report.counts == {}
    assert "softmax_fwd" not in launches
    (skip,) = report.skipped
    assert skip.pattern == "softmax" and "float64" in skip.reason
    assert "float64" in str(report)


def test_block_inference_and_training_match_eager(poison):
    torch.manual_seed(0)
    block = Block(dim=32, heads=4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    compiled, backend = compile_tile(block)
    with _common.count_launches() as launches:
        out = compiled(x)
        out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    ref = block(x)
    ref.square().sum().backward()
    ref_grads = [p.grad for p in block.parameters()] + [x.grad]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)
    # rewritten before autograd: the tile ops' own backward formulas run the bwd kernels
    pre = backend.report.graphs[0]
    assert pre.name == "forward, before autograd", str(backend.report)
    assert pre.counts == {"layer_norm": 2, "softmax": 1, "addmm": 4, "bmm": 2}, str(backend.report)
    # the forward graph fuses the scale and the causal mask into the softmax
    for k in ["layer_norm_fwd", "layer_norm_bwd", "scale_mask_softmax_fwd", "softmax_bwd", "mm"]:
        assert launches[k] >= 1, (k, dict(launches))


def test_tiny_transformer_rms_inference(poison):
    model = TinyTransformer(dim=32, layers=1, norm="rms")
    tokens = torch.randint(0, 97, (2, 7))
    report, launches = run_checked(model, tokens, atol=1e-4, rtol=1e-4)
    assert report.counts.get("rms_norm_llama") == 3, str(report)
    # the block's second norm and the final norm take their residual adds with them
    assert report.counts.get("fused_add_rms_norm") == 2, str(report)
    assert launches["rms_norm_fwd"] == 1 and launches["add_rms_norm_fwd"] == 2
    assert launches["log_softmax_fwd"] == 1


def test_dynamic_shapes_one_graph(poison):
    ln = torch.nn.LayerNorm(16)
    fn = lambda x: torch.softmax(ln(x), -1)  # noqa: E731
    compiled, backend = compile_tile(fn, dynamic=True)
    for b, t in [(2, 3), (3, 5), (5, 7), (4, 13), (7, 2)]:
        x = torch.randn(b, t, 16)
        with _common.count_launches() as launches:
            torch.testing.assert_close(compiled(x), fn(x), atol=1e-5, rtol=1e-5)
        assert launches["softmax_fwd"] == 1 and launches["layer_norm_fwd"] == 1
    names = [g.name for g in backend.report.graphs]  # one compile serves every size
    assert names == ["forward, before autograd", "forward", "backward"], str(backend.report)


class _ScaledAttentionRMS(torch.nn.Module):
    """Floats as HF keeps them: an RMS norm's ``variance_epsilon``, an attention's
    ``scaling``; ``dynamic=True`` makes them graph inputs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16))
        self.variance_epsilon = 1e-6
        self.scaling = 0.25

    def forward(self, x, mask):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight * h
        return torch.softmax(h @ h.transpose(-1, -2) * self.scaling + mask, -1)


@pytest.mark.parametrize("specialize", [True, False])
def test_dynamic_module_floats_are_specialized_with_a_guard(poison, specialize):
    mod = _ScaledAttentionRMS()
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(
        options={"fallback": "eager", "specialize_floats": specialize}
    )
    compiled = torch.compile(mod, backend=backend, dynamic=True)
    with torch.no_grad():
        for t, eps in ((9, 1e-6), (7, 1e-6), (5, 0.5)):
            mod.variance_epsilon = eps  # a new value: the guard recompiles
            x, mask = torch.randn(2, t, 16), torch.randn(1, t, t)
            with _common.count_launches() as launches:
                got = compiled(x, mask)
            torch.testing.assert_close(got, mod(x, mask), atol=1e-5, rtol=1e-5)
            if specialize:
                assert launches["rms_norm_fwd"] == 1, str(backend.report)
                assert launches["scale_mask_softmax_fwd"] == 1, str(backend.report)
    names = " ".join(backend.report.specialized)
    if specialize:
        assert "variance_epsilon" in names and "scaling" in names
        assert "specialized" in str(backend.report)
    else:
        assert not names and not any("rms" in k for k in backend.report.counts)


def test_kernel_failure_falls_back_with_one_warning(monkeypatch):
    from tilebackend.codegen import softmax

    def boom(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(softmax, "softmax_fwd", boom)
    _common.reset_failures()
    x = torch.randn(4, 6)
    compiled, _ = compile_tile(lambda x: torch.softmax(x, -1))
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out1 = compiled(x)
            out2 = compiled(x + 1)
        torch.testing.assert_close(out1, torch.softmax(x, -1))
        torch.testing.assert_close(out2, torch.softmax(x + 1, -1))
        msgs = [str(m.message) for m in w if "softmax_fwd" in str(m.message)]
        assert len(msgs) == 1, msgs
    finally:
        _common.reset_failures()


def test_unknown_option_lists_valid_ones():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1, backend="tile", options={"bogus": 1})
    with pytest.raises(Exception, match=r"unknown tilebackend option 'bogus'.*fallback"):
        f(torch.randn(3))
    with pytest.raises(tilebackend.TileError, match="fallback"):
        tilebackend.TileBackend(options={"fallback": "nope"})


def test_explain_report():
    ln = torch.nn.LayerNorm(8)
    report = tilebackend.explain(lambda x: torch.softmax(ln(x), -1), torch.randn(3, 8))
    assert report.counts == {"layer_norm": 1, "softmax": 1}
    text = str(report)
    assert "replaced  softmax" in text and "float32[3, 8]" in text


def _run_py(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_backend_found_without_import():
    code = (
        "import torch; print(torch.compile(torch.nn.Linear(8, 8), backend='tile')"
        "(torch.randn(4, 8)).shape)"
    )
    res = _run_py(code, interpret=True)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([4, 8])" in res.stdout


def test_demo_runs_tile_kernels_in_a_fresh_process(device):
    """The README's main job, as a user runs it (no TRITON_INTERPRET: the demo sets it
    after asking whether it is set).  An interpreter flag cached before the demo set it
    once made every kernel refuse the CPU tensors, silently."""
    if device != "cpu":
        pytest.skip("the CPU path of the demo")
    code = "from tilebackend.__main__ import main; main(['demo', '--seq', '8'])"
    res = _run_py(code, interpret=False)
    assert res.returncode == 0, res.stderr
    launches = next(line for line in res.stdout.splitlines() if "launches in one forward" in line)
    assert "'addmm'" in launches and "'add_layer_norm_fwd'" in launches, res.stdout
    err = float(res.stdout.split("max |tile - eager| = ")[1].split()[0])
    assert err < 1e-4, res.stdout


def test_cpu_without_interpreter_falls_back_correctly():
    code = (
        "import torch, tilebackend\n"
        "x = torch.randn(4, 8)\n"
        "r = tilebackend.explain(lambda x: torch.softmax(x, -1), x)\n"
        "f = torch.compile(lambda x: torch.softmax(x, -1), backend='tile')\n"
        "torch.testing.assert_close(f(x), torch.softmax(x, -1))\n"
        "print(r.counts); print(r.skipped[0].reason)\n"
    )
    res = _run_py(code, interpret=False)
    assert res.returncode == 0, res.stderr
    assert "{}" in res.stdout and "TRITON_INTERPRET" in res.stdout


@pytest.mark.slow
def test_inductor_fallback_on_cpu(poison):
    ln = torch.nn.LayerNorm(16)
    x = torch.randn(3, 16)
    fn = lambda x: torch.softmax(ln(x).relu(), -1)  # noqa: E731
    report, _ = run_checked(
        fn, x, options={"fallback": "inductor"}, expect=["softmax_fwd", "norm_epilogue"]
    )  # (the ReLU is the norm's epilogue)
    assert report.counts == {"layer_norm": 1, "softmax": 1, "fused_norm_epilogue": 1}
    assert report.graphs[0].fallback == "inductor"


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_training_softmax_with_dtype_upcast(poison, fallback):
    """``softmax(x.half(), dtype=float32)`` in a training graph: the graph rewritten before
    autograd must stay differentiable ATen whatever the fallback (Inductor's decompositions
    would leave ``prims.convert_element_type``, which has no autograd formula)."""
    x = torch.randn(3, 4, 5, requires_grad=True)
    fn = lambda x: torch.softmax(x.half() * 2, -1, dtype=torch.float32)  # noqa: E731
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        out = torch.compile(fn, backend=backend)(x)
        out.sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref = fn(xr)
    ref.sum().backward()
    # fp16 tolerances: Inductor keeps x.half() * 2 in fp32 registers (so does Inductor alone)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-3, rtol=1e-3)
    # the half scale joins the kernel, which stores the fp32 probabilities the backward
    # saves; the backward writes the half gradient, the cast back and scale absorbed
    assert dict(launches) == {"scale_mask_softmax_fwd": 1, "scale_mask_softmax_bwd": 1}, dict(
        launches
    )


class _CachedKeyAttention(torch.nn.Module):
    """GPT-2's attention with an empty KV cache, on the CPU's math SDPA path."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(64, 192)
        self.register_buffer("past", torch.zeros(2, 4, 0, 16))

    def forward(self, x):
        q, k, _ = self.qkv(x).split(64, dim=-1)
        q = q.view(2, 8, 4, 16).transpose(1, 2)
        k = torch.cat([self.past, k.view(2, 8, 4, 16).transpose(1, 2)], -2)
        return ((q * 0.5) @ (k.transpose(-2, -1) * 0.5)).sum(-1)


def _train_step(model, x, fallback):
    """One compiled (:func:`compile_tile`) forward and ``square().sum()`` backward of
    ``model(x)``; returns the output, the backend and the tile launches."""
    compiled, backend = compile_tile(model, {"fallback": fallback})
    with _common.count_launches() as launches:
        out = compiled(x)
        out.square().sum().backward()
    return out, backend, launches


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_training_graph_views_survive_the_fallbacks_decompositions(poison, fallback):
    """The graph rewritten before autograd held ``view``s legal for eager's strides;
    Inductor's ``cat`` of an empty tensor and ``k`` keeps ``k``'s transposed layout, and
    the real compile's retrace raised "Cannot view a tensor ..." (GPT-2 training on CPU
    with the Inductor fallback).  Those views are reshapes now."""
    model = _CachedKeyAttention()
    x = torch.randn(2, 8, 64, requires_grad=True)
    out, backend, launches = _train_step(model, x, fallback)
    assert launches["addmm"] == 1 and launches["bmm"] >= 1, dict(launches)
    assert backend.report.graphs[0].name == "forward, before autograd"
    ref = grads_like_eager([x, *model.parameters()], lambda: model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class _BiasedAttention(torch.nn.Module):
    """T5's attention: SDPA with a learned position bias as the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(32)
        self.qkv = torch.nn.Linear(32, 96)
        self.bias = torch.nn.Parameter(torch.randn(1, 4, 7, 7))

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
        mask = self.bias.expand(2, 4, 7, 7).clone()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return out.transpose(1, 2).reshape(2, 7, 32)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_training_attention_with_a_learned_mask(poison, fallback):
    """The graph rewritten before autograd is traced without grad, where SDPA picks CPU
    flash attention, which takes no gradient for its mask: the real compile raised "not
    differentiable with respect to argument 'attn_mask'" (T5 training).  The kernel
    call is SDPA again, and the compile under grad picks."""
    model = _BiasedAttention()
    x = torch.randn(2, 7, 32, requires_grad=True)
    out, backend, launches = _train_step(model, x, fallback)
    assert launches["layer_norm_fwd"] == 1 and launches["layer_norm_bwd"] == 1, dict(launches)
    assert backend.report.graphs[0].name == "forward, before autograd"
    ref = grads_like_eager([x, *model.parameters()], lambda: model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_training_attention_with_a_learned_mask_on_the_gpu(fallback):
    """On a GPU the no-grad trace picks memory-efficient attention without its
    log-sum-exp, which its backward reads: gradients must still match eager's."""
    model = _BiasedAttention().cuda().half()
    x = torch.randn(2, 7, 32, device="cuda", dtype=torch.half, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with _common.count_launches() as launches:
        out = torch.compile(model, backend=backend)(x)
        out.float().square().sum().backward()
    assert launches["layer_norm_fwd"] == 1 and launches["layer_norm_bwd"] == 1, dict(launches)
    ref = grads_like_eager([x, *model.parameters()], lambda: model(x).float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_restore_sdpa_puts_the_composite_back(kv_heads):
    """Qwen2 / StableLM: the kernel took GQA's fewer key/value heads, so the SDPA call
    put back must say ``enable_gqa``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tilebackend.fx_passes.sdpa import restore_sdpa

    def attend(q, k, v, m):
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.5, enable_gqa=gqa)

    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, kv_heads, 5, 8), torch.randn(2, kv_heads, 5, 8)
    m = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        gm = make_fx(attend)(q, k, v, m)
    kernels = [n for n in gm.graph.nodes if "flash_attention_for_cpu" in str(n.target)]
    assert kernels, gm.code  # (what a no-grad trace picks on CPU)
    assert restore_sdpa(gm)
    assert "flash" not in gm.code and "scaled_dot_product_attention.default" in gm.code
    leaves = [t.clone().requires_grad_() for t in (q, k, v, m)]
    out = gm(*leaves)
    torch.testing.assert_close(out, attend(q, k, v, m))
    out.sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, k, v, m)]
    attend(*refs).sum().backward()
    for a, b in zip(leaves, refs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_dynamic_first_compile_traces_patterns_and_survives_restarts(poison):
    """Patterns traced for the first time inside a dynamic compile (Dynamo may restart
    analysis to specialise a float): every size runs the kernels, one graph, and the
    report holds only the final attempt."""
    from tilebackend.fx_passes import matcher

    matcher._variants_cached.cache_clear()
    model = TinyTransformer(dim=32, layers=1, norm="rms")
    compiled, backend = compile_tile(model, dynamic=True)
    for b, t in [(2, 3), (3, 5), (5, 7), (4, 13)]:
        x = torch.randint(0, 97, (b, t))
        with _common.count_launches() as launches:
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
        assert launches["rms_norm_fwd"] + launches["add_rms_norm_fwd"] == 3
        assert launches["log_softmax_fwd"] == 1
    assert [g.name for g in backend.report.graphs][0] == "forward, before autograd"
    assert backend.report.counts["rms_norm_llama"] == 3, str(backend.report)


def test_options_reach_kernels_at_run_time_forward_and_backward():
    """poison_outputs is read by the kernels when they run, not when compiling."""
    seen = []
    real_empty = _common.empty

    def spy(shape, dtype, device):
        seen.append(tilebackend.settings.current().poison_outputs)
        return real_empty(shape, dtype, device)

    ln = torch.nn.LayerNorm(8)
    x = torch.randn(3, 8, requires_grad=True)
    compiled, _ = compile_tile(
        lambda x: torch.softmax(ln(x), -1), options={"fallback": "eager", "poison_outputs": True}
    )
    import unittest.mock

    with unittest.mock.patch.object(_common, "empty", spy):
        compiled(x).sum().backward()
    assert seen and all(seen), seen


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "default"])
def test_mode_options_reach_the_inductor_fallback(poison, monkeypatch, mode):
    """``mode=`` compiles the Inductor fallback's graph with that mode's Inductor options
    (CUDA graphs for reduce-overhead, which Inductor skips for CPU graphs), and the tile
    kernels still run."""
    from tilebackend import _compat

    seen: list[dict] = []
    compile_fx = _compat.inductor_compile_fx

    def spy(*args, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return compile_fx(*args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(_compat, "inductor_compile_fx", spy)
    ln = torch.nn.LayerNorm(16)
    x = torch.randn(3, 16)
    backend = tilebackend.TileBackend(mode=mode, options={"fallback": "inductor"})
    fn = torch.compile(lambda x: torch.softmax(ln(x).relu(), -1), backend=backend)
    with _common.count_launches() as n:
        out = fn(x)
    assert dict(n) == {"norm_epilogue": 1, "softmax_fwd": 1}, dict(n)  # (ReLU in the norm's)
    torch.testing.assert_close(out, torch.softmax(ln(x).relu(), -1), atol=1e-5, rtol=1e-5)
    assert seen == [torch._inductor.list_mode_options(mode)]
    if mode != "default":
        assert seen[0]["triton.cudagraphs"] is True


def test_cuda_graph_mode_with_eager_fallback_warns_once_for_a_gpu_graph(poison, monkeypatch):
    """``mode="reduce-overhead"`` with the eager fallback runs a GPU graph without CUDA
    graphs: said once.  A CPU graph has none with any fallback: nothing to say."""
    from tilebackend import backend as backend_module

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(mode="reduce-overhead", options={"fallback": "eager"})
    fn = torch.compile(lambda x: torch.softmax(x * 2, -1), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(torch.randn(3, 5))
    monkeypatch.setattr(backend_module, "_is_gpu_graph", lambda inputs: True)
    with pytest.warns(RuntimeWarning, match="without them"):
        fn(torch.randn(4, 7, 2))  # (another rank: a recompile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(torch.randn(4, 7, 2, 3))  # a recompile does not warn again


def test_graph_plain_inductor_compiled_first_still_gets_tile_kernels(poison):
    """AOTAutograd's cache is keyed by the Dynamo graph, not by our inner compile: with
    it on, a graph plain Inductor had compiled (this process or any sharing the cache
    dir) was loaded from Inductor's artifact and the tile backend did nothing."""
    fn = lambda x: torch.softmax(x * 0.375, -1)  # noqa: E731
    x = torch.randn(4, 29)
    torch._dynamo.reset()
    torch.compile(fn)(x)  # plain Inductor: its artifact lands in the caches
    _scaled_softmax_on_tile_inductor(fn, x)


def _scaled_softmax_on_tile_inductor(fn, x) -> None:
    """Compile ``fn`` (a scaled softmax) afresh with the Inductor fallback, run it, and
    check the numbers, the one fused launch and the report."""
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "inductor"})
    with _common.count_launches() as n:
        out = torch.compile(fn, backend=backend)(x)
    torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
    assert dict(n) == {"scale_mask_softmax_fwd": 1}, dict(n)
    assert backend.report.counts == {"softmax": 1, "fused_scale_mask_softmax": 1}


def test_inductor_fallback_graphs_are_cached_by_inductor(poison):
    """Our graphs go through Inductor's FX graph cache: the decomposition table we pass
    pickles stably (an OpOverload does not, and every tile graph bypassed the cache), so
    a second compile of the same graph is a hit, and still runs the tile kernels."""
    from torch._dynamo.utils import counters

    fn = lambda x: torch.softmax(x * 0.625, -1) + 1  # noqa: E731
    x = torch.randn(3, 23)
    for _ in range(2):
        counters.clear()
        _scaled_softmax_on_tile_inductor(fn, x)
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0, dict(counters["inductor"])
    assert counters["inductor"]["fxgraph_cache_hit"] == 1, dict(counters["inductor"])


@pytest.mark.parametrize("dynamic", [False, True])
def test_anchors_no_pattern_took_reach_inductor_decomposed(poison, dynamic):
    """Our decomposition table keeps softmax and layer norm whole for the patterns; when
    none takes them (here: disabled), Inductor must get them as it would have alone:
    torch 2.11's Inductor refused to compile ``aten._softmax`` ("both a fallback and a
    decomp"), and later ones ran it unfused, as an ATen call."""
    from torch._inductor.utils import run_and_get_code

    ln = torch.nn.LayerNorm(37)
    fn = lambda x: torch.softmax(ln(x) * 0.5, -1)  # noqa: E731
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(
        options={
            "fallback": "inductor",
            "disable": ("softmax", "layer_norm"),
            "compile_cache": False,
        }
    )
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
    codes = []
    for rows in (5, 11) if dynamic else (5,):
        x = torch.randn(rows, 37)
        with torch.no_grad(), _common.count_launches() as n:
            if codes:  # (run_and_get_code recompiles)
                out = compiled(x)
            else:
                out, codes = run_and_get_code(compiled, x)
        torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
        assert dict(n) == {}, dict(n)
    code = "\n".join(codes)
    assert "cpp_fused__softmax_mul_native_layer_norm" in code, code
    assert "aten._softmax.default(" not in code, code
    assert "aten.native_layer_norm.default(" not in code, code
    (graph,) = backend.report.graphs
    assert graph.notes == [
        "left to Inductor, decomposed as it would: _softmax x1, native_layer_norm x1"
    ]


def test_training_anchors_no_pattern_took_reach_inductor_decomposed(poison):
    ln = torch.nn.LayerNorm(37)
    x = torch.randn(5, 37, requires_grad=True)
    fn = lambda x: torch.log_softmax(ln(x) * 0.5, -1)  # noqa: E731
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(
        options={"fallback": "inductor", "disable": ("log_softmax",), "compile_cache": False}
    )
    with _common.count_launches() as n:
        out = torch.compile(fn, backend=backend)(x)
        out.square().sum().backward()
    # (the scale the log-softmax pattern would have taken is the norm's epilogue)
    assert n["norm_epilogue"] == 1 and n["layer_norm_bwd"] == 1, dict(n)
    ref = grads_like_eager([x, *ln.parameters()], lambda: fn(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    notes = [note for g in backend.report.graphs for note in g.notes]
    assert any("_log_softmax x1" in note for note in notes), str(backend.report)


def test_a_symbolic_float_where_a_pattern_has_a_constant_is_explained(poison):
    """``dynamic=True`` makes a function's float argument (an RMS norm's ``eps=1e-6``
    default) a graph input; the written-out norm is then no match, which the report did
    not say ("no candidates")."""

    def rms(x, w, eps=1e-6):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    compiled, backend = compile_tile(rms, dynamic=True)
    x, w = torch.randn(2, 5, 16), torch.rand(16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w), rms(x, w), atol=1e-5, rtol=1e-5)
    reasons = [s.reason for s in backend.report.skipped]
    assert any("'eps' is a graph value here" in r for r in reasons), reasons


def test_a_leftover_whose_decomposition_casts_reaches_inductor_decomposed(poison):
    """A half layer norm with fp32 parameters (as autocast makes them) is refused by the
    kernel; Inductor's decomposition of it casts with ``aten._to_copy``, which was left
    whole, so Inductor failed ("both a fallback and a decomp for same op") and the graph
    ran unfused.  The casts are decomposed too now."""
    x, w, b = torch.randn(2, 5, 24).half(), torch.randn(24), torch.randn(24)

    def fn(x, w, b):
        return F.layer_norm(x, (24,), w, b) * 2

    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "inductor"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = torch.compile(fn, backend=backend)(x, w, b)
    torch.testing.assert_close(out, fn(x, w, b), atol=2e-3, rtol=2e-3)
    notes = [n for g in backend.report.graphs for n in g.notes]
    assert any("native_layer_norm x1" in n for n in notes), notes
    assert not any("Inductor failed" in n for n in notes), notes


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_training_with_a_symbolic_float_scale(poison, fallback):
    """``dynamic=True`` makes a closure's float scale a 0-dim tensor input, and Dynamo
    writes its casts as ``prims.convert_element_type`` (no autograd formula): the
    pre-autograd graph must still be one autograd differentiates (it crashed)."""

    def make(scale):
        return lambda x, m: torch.softmax((x * scale).masked_fill(m, float("-inf")), -1)

    fn = make(2.0)
    x = torch.randn(2, 3, 16, dtype=torch.float16, requires_grad=True)
    m = torch.rand(2, 3, 16) < 0.3
    m[..., 0] = False  # (no all-masked rows: their NaNs would hide a wrong gradient)
    options = {"fallback": fallback, "compile_cache": False}
    compiled, backend = compile_tile(fn, options, dynamic=True)
    with _common.count_launches() as launches:
        compiled(x, m).float().square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    fn(x, m).float().square().sum().backward()
    torch.testing.assert_close(got, x.grad, atol=2e-3, rtol=2e-3)
    assert launches["softmax_bwd"] == 1 or launches["scale_mask_softmax_bwd"] == 1, dict(launches)
    pre = backend.report.graphs[0]
    assert pre.name == "forward, before autograd" and pre.replacements, str(backend.report)


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_bf16_gemm_on_the_cpu_stays_aten(fallback):
    """Triton's CPU interpreter multiplies bf16 ``tl.dot`` operands' bit patterns, so a
    bf16 GEMM on the CPU is left to ATen (the report says why) rather than be wrong; with
    Inductor the leftover ``mm`` it declines to decompose leaves no dead casts behind."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24).to(torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    fn = lambda x: torch.relu(lin(x)) @ lin.weight  # noqa: E731
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": fallback})
    with torch.no_grad(), _common.count_launches() as launches:
        out = torch.compile(fn, backend=backend)(x)
        ref = fn(x)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    assert not any(k.startswith(("mm", "addmm", "bmm")) for k in launches), dict(launches)
    assert any("triton#11584" in s.reason for s in backend.report.skipped), str(backend.report)


class _StraightThrough(torch.autograd.Function):
    """Round in the forward, pass the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


def _bn_softmax():
    m = torch.nn.Sequential(torch.nn.BatchNorm1d(16), torch.nn.Softmax(-1))
    return m, lambda x: m(x), torch.randn(8, 16)


def _emb_max_norm():
    emb, ln = torch.nn.Embedding(10, 16, max_norm=1.0), torch.nn.LayerNorm(16)
    ids = torch.tensor([[1, 2, 3, 1], [4, 5, 6, 7]])
    return torch.nn.ModuleList([emb, ln]), lambda _: ln(emb(ids) * 3.0), torch.randn(1)


def _custom_function():
    ln = torch.nn.LayerNorm(16)
    return ln, lambda x: _StraightThrough.apply(ln(x) * 4.0).softmax(-1), torch.randn(8, 16)


def _item_of_a_grad_tensor():
    ln = torch.nn.LayerNorm(16)
    return ln, lambda x: ln(x) * x.max().item(), torch.randn(8, 16)


@pytest.mark.parametrize(
    "make", [_bn_softmax, _emb_max_norm, _custom_function, _item_of_a_grad_tensor]
)
def test_training_graphs_a_no_grad_trace_cannot_stand_for(poison, make):
    """Graphs whose no-grad ATen trace autograd must not differentiate in their place:
    BatchNorm's running statistics (an in-place update: the compile used to fail), an
    ``Embedding(max_norm=...)`` (its weight renormed in place: no gradient), a custom
    ``autograd.Function`` (its backward ignored) and ``.item()`` of a tensor that needs
    grad (gradients flowed through the number).  They are rewritten after partitioning
    only: the tile kernels still run, the gradients are autograd's."""
    torch.manual_seed(0)
    module, fn, x = make()
    x.requires_grad_()
    f, backend = compile_tile(fn, fullgraph=make is _item_of_a_grad_tensor)
    with _common.count_launches() as launches:
        f(x).square().sum().backward()
    leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
    got = [None if t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    module.train()
    fn(x).square().sum().backward()
    for g, t in zip(got, leaves, strict=True):
        if t.grad is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, t.grad, atol=1e-4, rtol=1e-4)
    names = [g.name for g in backend.report.graphs]
    assert "forward, before autograd" not in names and "backward" in names, names
    assert sum(launches.values()) >= 2, dict(launches)


def test_a_graph_inductor_cannot_compile_runs_as_aten_ops_with_the_tile_kernels(
    poison, monkeypatch
):
    """When Inductor fails on a rewritten graph (its lowering of a saved permuted view
    with symbolic strides did, on HF ConvNeXt's training step under dynamic=True), the
    graph runs node by node, tile kernels included: a warning and a report note per
    graph, eager's numbers, and the model is not lost."""
    from tilebackend import _compat

    def failing_compile_fx_inner():
        def compile_fx_inner(gm, inputs, **kwargs):
            raise RuntimeError("lowering failed")

        return compile_fx_inner

    monkeypatch.setattr(_compat, "inductor_compile_fx_inner", failing_compile_fx_inner)
    torch.manual_seed(0)
    ln, lin = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)

    def fn(x):
        return F.gelu(lin(ln(x)))

    x = torch.randn(3, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "inductor", "compile_cache": False})
    with pytest.warns(RuntimeWarning, match="Inductor failed to compile the rewritten forward"):
        with _common.count_launches() as launches:
            out = torch.compile(fn, backend=backend)(x)
            out.square().sum().backward()
    assert launches["layer_norm_fwd"] == 1 and launches["layer_norm_bwd"] == 1, dict(launches)
    assert launches["mm_epilogue_multi"] == 1, dict(launches)  # (it saves the GEMM too)
    notes = [n for g in backend.report.graphs for n in g.notes if "Inductor failed" in n]
    assert len(notes) == 2 and "lowering failed" in notes[0], str(backend.report)
    got = x.grad.clone()
    x.grad = None
    ref = fn(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)


def test_weighted_rms_norm_over_two_dims_is_refused_with_a_reason(poison):
    """A weighted RMS norm written over the last two dims: the weighted patterns refuse
    it with a reason (their check raised a TypeError on the dim list); the no-weight
    pattern takes the norm, the weight multiplies apart; eager's numbers."""
    w = torch.randn(8)

    def fn(x):
        return x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6) * w

    x = torch.randn(2, 3, 5, 8)
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with _common.count_launches() as launches:
        out = torch.compile(fn, backend=backend)(x)
    torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
    assert dict(launches) == {"rms_norm_fwd": 1}, dict(launches)
    reasons = [s.reason for g in backend.report.graphs for s in g.skipped]
    assert any("normalizes over dim [-2, -1]" in r for r in reasons), reasons
    assert not any("raised" in r for r in reasons), reasons
