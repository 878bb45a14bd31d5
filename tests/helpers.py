"""Helpers shared by the test modules (pytest puts ``tests/`` on the import path)."""

from __future__ import annotations

import torch

import tilebackend


def grads_like_eager(leaves, eager, atol, rtol):
    """The gradients a compiled run left on ``leaves`` match eager's: they are taken and
    cleared, then ``eager().square().sum()`` is differentiated.  Returns eager's output."""
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = eager()
    ref.square().sum().backward()
    for g, t in zip(got, leaves, strict=True):
        torch.testing.assert_close(g, t.grad, atol=atol, rtol=rtol)
    return ref


def compile_tile(fn, options=None, **kw):
    """``(torch.compile(fn, backend=tile), backend)`` after a Dynamo reset; ``options``
    default to the eager fallback."""
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options=options or {"fallback": "eager"})
    return torch.compile(fn, backend=backend, **kw), backend


def inference_like_eager(fn, *args, options=None, atol=1e-5, rtol=1e-5, **kw):
    """Compile ``fn`` afresh (:func:`compile_tile`), run it without grad and compare it
    with eager: ``(backend, launches)``, the tile kernels one call launched."""
    from tilebackend.codegen import _common

    compiled, backend = compile_tile(fn, options, **kw)
    with torch.no_grad(), _common.count_launches() as launches:
        out = compiled(*args)
        ref = fn(*args)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    return backend, launches


def gpt2_mlp_operands(device, m: int = 4096, n: int = 3072, k: int = 768):
    """bf16 ``(a, w, bias, res)`` of GPT-2's MLP up-projection (``a @ w.t() + bias``, a
    residual tile ``res``), for the GPU tests of the generated epilogues."""
    bf16 = torch.bfloat16
    a = torch.randn(m, k, device=device, dtype=bf16)
    w = torch.randn(n, k, device=device, dtype=bf16) / k**0.5
    bias = torch.randn(n, device=device, dtype=bf16)
    res = torch.randn(m, n, device=device, dtype=bf16)
    return a, w, bias, res
