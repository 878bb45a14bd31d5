"""The dual GEMM with a generated epilogue (``tile::dual_mm_epilogue``): SwiGLU's
``silu(x @ W1) * (x @ W3)`` in one launch, against eager in double precision.

On CPU the kernel runs in Triton's interpreter: sizes stay tiny.  bf16 GEMMs run only on a
GPU (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tilebackend.codegen import _common, dual_matmul, fused_matmul, matmul
from tilebackend.codegen import pointwise as pw

SWIGLU = ("mul", ("silu", "ACC"), "ACC1")
DTYPES = pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)


def _boom(*a, **k):
    raise RuntimeError("injected kernel failure")


def _ref(x, w1, w3, b1=None, b3=None):
    """SwiGLU in double precision (Linear weights ``[N, K]``)."""
    h1 = x.double() @ w1.double().t()
    h3 = x.double() @ w3.double().t()
    if b1 is not None:
        h1 = h1 + b1.double()
    if b3 is not None:
        h3 = h3 + b3.double()
    return F.silu(h1) * h3


def _swiglu(x, w1, w3, b1=None, b3=None, extras=(), expr=SWIGLU):
    with _common.count_launches() as n:
        out = torch.ops.tile.dual_mm_epilogue(
            x, w1.t(), w3.t(), b1, b3, list(extras), pw.dumps(expr)
        )
    assert dict(n) == {"dual_mm_epilogue": 1}, dict(n)
    return out


# (leading dims of x, K, N): M = 1, primes, N not a multiple of the block (the
# interpreter's blocks are at most 32), K ragged (13, 17) and even (32), several tiles
@pytest.mark.parametrize(
    "lead, K, N",
    [((1,), 16, 24), ((7,), 13, 17), ((13,), 17, 7), ((2, 5), 32, 40), ((37,), 16, 33)],
    ids=str,
)
@DTYPES
def test_swiglu_shapes(poison, gen_dir, device, lead, K, N, dtype, tol):
    x = torch.randn(*lead, K, device=device).to(dtype)
    w1 = torch.randn(N, K, device=device).to(dtype)
    w3 = torch.randn(N, K, device=device).to(dtype)
    out = _swiglu(x, w1, w3)
    assert out.shape == (*lead, N) and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any()  # every element was written over the poison
    torch.testing.assert_close(out.double(), _ref(x, w1, w3), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("biases", ["both", "first", "second", "2d"])
@DTYPES
def test_swiglu_biases(poison, gen_dir, device, biases, dtype, tol):
    M, K, N = 7, 13, 17
    x = torch.randn(M, K, device=device).to(dtype)
    w1, w3 = (torch.randn(N, K, device=device).to(dtype) for _ in range(2))
    b1 = torch.randn(N, device=device).to(dtype) if biases in ("both", "first") else None
    b3 = torch.randn(N, device=device).to(dtype) if biases in ("both", "second") else None
    if biases == "2d":  # [M, N] biases of addmm
        b1, b3 = (torch.randn(M, N, device=device).to(dtype) for _ in range(2))
    out = _swiglu(x, w1, w3, b1, b3)
    torch.testing.assert_close(out.double(), _ref(x, w1, w3, b1, b3), atol=tol * 4, rtol=tol)


@DTYPES
def test_noncontiguous_operands(poison, gen_dir, device, dtype, tol):
    K, N = 13, 17
    # a transposed 2-D a (column-major), and a 3-D a whose leading dims do not fold
    a2 = torch.randn(K, 7, device=device).to(dtype).t()
    a3 = torch.randn(2, K, 5, device=device).to(dtype).transpose(1, 2)
    # b0 row-major [K, N], b1 a weight's transpose, both sliced
    b0 = torch.randn(K, 2 * N, device=device).to(dtype)[:, ::2]
    w1 = torch.randn(N, K + 3, device=device).to(dtype)[:, 3:]
    for a in (a2, a3):
        assert not a.is_contiguous()
        out = torch.ops.tile.dual_mm_epilogue(a, b0, w1.t(), None, None, [], pw.dumps(SWIGLU))
        ref = F.silu(a.double() @ b0.double()) * (a.double() @ w1.double().t())
        assert out.shape == (*a.shape[:-1], N)
        torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)


@DTYPES
def test_extras_in_the_epilogue(poison, gen_dir, device, dtype, tol):
    """A residual (broadcast over the batch, not copied) and a bool mask as extras, and
    an expression that reads ACC1 before ACC."""
    B, T, K, N = 2, 5, 16, 19
    x = torch.randn(B, T, K, device=device).to(dtype)
    w1, w3 = (torch.randn(N, K, device=device).to(dtype) for _ in range(2))
    resid = torch.randn(1, T, N, device=device).to(dtype)
    keep = torch.rand(B, T, N, device=device) > 0.3
    expr = ("where", "IN1", ("add", ("mul", ("relu", "ACC1"), ("tanh", "ACC")), "IN0"), 0.0)
    out = _swiglu(x, w1, w3, extras=[resid, keep], expr=expr)
    h1, h3 = x.double() @ w1.double().t(), x.double() @ w3.double().t()
    ref = torch.where(keep, torch.relu(h3) * torch.tanh(h1) + resid.double(), 0.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)
    # an fp32 extra promotes the result to fp32, as eager does
    r32 = torch.randn(B, T, N, device=device)
    out = _swiglu(x, w1, w3, extras=[r32], expr=("add", ("mul", "ACC", "ACC1"), "IN0"))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), h1 * h3 + r32.double(), atol=tol * 4, rtol=tol)


def test_source_cache(gen_dir):
    k1 = dual_matmul.kernel_for(SWIGLU)
    assert dual_matmul.kernel_for(pw.dumps(SWIGLU)) is k1
    (path,) = gen_dir.glob("dual_mm_epilogue_*.py")
    src = path.read_text()
    compile(src, str(path), "exec")
    assert "def dual_mm_epilogue_kernel" in src and pw.dumps(SWIGLU) in src
    assert "acc0" in src and "acc1" in src


def test_tuning_space_is_smaller_than_matmul():
    for dtype, precision in ((torch.float16, "tf32"), (torch.float32, "ieee")):
        space = dual_matmul.config_space(dtype, precision)
        # two fp32 accumulators within 64 registers a thread
        assert space and all(
            c["BLOCK_M"] * c["BLOCK_N"] * 2 <= 64 * 32 * c.num_warps for c in space
        )
        assert len(space) <= len(matmul.config_space(dtype, precision))
    specs = dual_matmul.sm90_specs()
    assert len({s["name"] for s in specs}) == len(specs) > 0


def test_fake_and_refusals(gen_dir):
    from torch._subclasses.fake_tensor import FakeTensorMode

    expr = pw.dumps(SWIGLU)
    with FakeTensorMode():
        a = torch.empty(2, 3, 8, dtype=torch.float16)
        b = torch.empty(8, 6, dtype=torch.float16)
        out = torch.ops.tile.dual_mm_epilogue(a, b, b, None, None, [], expr)
        assert out.shape == (2, 3, 6) and out.dtype == torch.float16
        r = torch.empty(6, dtype=torch.float32)
        out = torch.ops.tile.dual_mm_epilogue(a, b, b, None, None, [r], '["add","ACC1","IN0"]')
        assert out.dtype == torch.float32
    a, b = torch.randn(4, 8), torch.randn(8, 6)
    check = dual_matmul.check
    assert check(a, b, b, None, None, [], expr) is None
    assert "differ in shape" in check(a, b, torch.randn(8, 5), None, None, [], expr)
    assert "one dtype" in check(a, b, b.half(), None, None, [], expr)
    assert "IN0" in check(a, b, b, None, None, [], '["add","ACC","IN0"]')
    assert "bias1" in check(a, b, b, None, torch.randn(5), [], expr)
    assert "K == 0" in check(
        torch.randn(4, 0), torch.randn(0, 6), torch.randn(0, 6), None, None, [], expr
    )
    # the single-GEMM epilogue has no second accumulator
    assert "ACC1" in fused_matmul.check(a, b, None, [], expr)
    # refused inputs still give eager's result
    out = torch.ops.tile.dual_mm_epilogue(a.double(), b.double(), b.double(), None, None, [], expr)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.silu(a.double() @ b.double()) * (a.double() @ b.double()))


def test_backward_recomputes(gen_dir):
    a = torch.randn(3, 5, 8, requires_grad=True)
    w1, w3 = (torch.randn(6, 8, requires_grad=True) for _ in range(2))
    b1, b3 = (torch.randn(6, requires_grad=True) for _ in range(2))
    r = torch.randn(3, 5, 6, requires_grad=True)
    expr = '["add",["mul",["silu","ACC"],"ACC1"],"IN0"]'
    out = torch.ops.tile.dual_mm_epilogue(a, w1.t(), w3.t(), b1, b3, [r], expr)
    g = torch.randn_like(out)
    params = [a, w1, w3, b1, b3, r]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(F.silu(a @ w1.t() + b1) * (a @ w3.t() + b3) + r, params, g)
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_fault_falls_back_once(gen_dir, monkeypatch, clean_failures):
    monkeypatch.setattr(dual_matmul, "dual_matmul_epilogue", _boom)
    a, b0, b1 = torch.randn(3, 8), torch.randn(8, 5), torch.randn(8, 5)
    expr = pw.dumps(SWIGLU)
    with pytest.warns(RuntimeWarning, match="dual_mm_epilogue"):
        out = torch.ops.tile.dual_mm_epilogue(a, b0, b1, None, None, [], expr)
    torch.testing.assert_close(out, F.silu(a @ b0) * (a @ b1))
    assert _common.fallback_counts["dual_mm_epilogue"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.ops.tile.dual_mm_epilogue(a, b0, b1, None, None, [], expr)
