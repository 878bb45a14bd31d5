"""Fused kernels: the pointwise printer, GEMM + generated epilogue (``tile::mm_epilogue``),
scale + mask + softmax, and residual add + layer / RMS norm.

On CPU the kernels run in Triton's interpreter: sizes stay tiny.  bf16 GEMMs run only on a
GPU (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from tilebackend.codegen import _common, fused_matmul, fused_norm, fused_softmax, pointwise
from tilebackend.codegen import pointwise as pw
from tilebackend.codegen import pointwise_aten as pa

# GPT-2's gelu-tanh written out over the GEMM accumulator (as the graph pass produces it)
GELU_TANH = (
    "mul",
    ("mul", "ACC", 0.5),
    (
        "add",
        (
            "tanh",
            ("mul", ("add", "ACC", ("mul", ("pow", "ACC", 3.0), 0.044715)), 0.7978845608028654),
        ),
        1.0,
    ),
)


def _boom(*a, **k):
    raise RuntimeError("injected kernel failure")


# --- the printer -------------------------------------------------------------------------

# (expr, torch reference on the leaves ACC=a, IN0=b, IN1=c) for every node kind
CASES = [
    (("add", "ACC", "IN0"), None),
    (("sub", "ACC", 2.0), None),
    (("sub", 1.0, "ACC"), None),
    (("mul", "ACC", "IN0"), None),
    (("div", "ACC", ("add", ("abs", "IN0"), 0.5)), None),
    (("pow", "ACC", 3.0), None),
    (("pow", "ACC", 2.0), None),
    (("pow", ("abs", "ACC"), 0.37), None),
    (("pow", ("add", ("abs", "ACC"), 0.1), "IN0"), None),
    (("tanh", "ACC"), None),
    (("gelu", "ACC", "tanh"), None),
    (("gelu", "ACC", "none"), None),
    (("relu", "ACC"), None),
    (("silu", "ACC"), None),
    (("sigmoid", "ACC"), None),
    (("erf", "ACC"), None),
    (("exp", "ACC"), None),
    (("log", ("abs", "ACC")), None),
    (("rsqrt", ("add", ("abs", "ACC"), 0.1)), None),
    (("sqrt", ("abs", "ACC")), None),
    (("reciprocal", ("add", ("abs", "ACC"), 0.5)), None),
    (("neg", "ACC"), None),
    (("maximum", "ACC", "IN0"), None),
    (("minimum", "ACC", 0.0), None),
    (("where", ("gt", "ACC", "IN0"), "ACC", 0.0), None),
    (("where", "IN1", -math.inf, "ACC"), None),
    (("where", ("logical_not", "IN1"), "ACC", "IN0"), None),
    (("add", ("to", "ACC", "float16"), "IN0"), None),
    (("mul", ("to", ("mul", "ACC", 3.0), "bfloat16"), 1.0), None),
    (("add", ("to", "IN1", "float32"), "ACC"), None),
    (GELU_TANH, None),
    (("log1p", ("abs", "ACC")), None),
    (("expm1", "ACC"), None),
    (("sin", "ACC"), None),
    (("cos", "ACC"), None),
    (("sign", "ACC"), None),
    (("where", ("logical_and", ("gt", "ACC", 0.0), "IN1"), "ACC", "IN0"), None),
    (("where", ("logical_or", "IN1", ("lt", "ACC", -0.5)), "ACC", 1.0), None),
]


def _printer_kernel_run(expr, leaves):
    """Evaluate ``expr`` through the generated GEMM epilogue with an identity GEMM:
    ACC = I @ acc_value, so the printed code runs in the interpreter on given values."""
    acc = leaves["ACC"]
    eye = torch.eye(acc.shape[-2], dtype=acc.dtype)
    extras = [leaves[k] for k in sorted(k for k in leaves if k != "ACC")]
    return torch.ops.tile.mm_epilogue(eye, acc, None, extras, pw.dumps(expr))


@pytest.mark.parametrize("expr", [c[0] for c in CASES], ids=lambda e: pw.dumps(e)[:40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_printer_matches_eager(gen_dir, expr, dtype):
    # odd shapes; IN0 broadcasts along rows ([1, N]), IN1 is a bool [M, 1] column
    a = torch.randn(5, 7).to(dtype)
    b = torch.randn(1, 7).to(dtype)
    c = torch.rand(5, 1) > 0.5
    leaves = {"ACC": a, "IN0": b, "IN1": c}
    used = pw.input_leaves(expr)
    leaves = {k: v for k, v in leaves.items() if k == "ACC" or k in used}
    # keep IN numbering: when IN1 is used alone, IN0 must still be passed
    if "IN1" in leaves and "IN0" not in leaves:
        leaves["IN0"] = b
    with _common.count_launches() as n:
        out = _printer_kernel_run(expr, leaves)
    assert n["mm_epilogue"] == 1
    ref = pw.evaluate(expr, leaves)
    assert out.dtype == ref.dtype == pw.infer_dtype(expr, {k: v.dtype for k, v in leaves.items()})
    assert out.shape == ref.shape
    # fp32 reference (the kernel does not round intermediates): upcast leaves
    up = {k: (v.double() if v.is_floating_point() else v) for k, v in leaves.items()}
    ref32 = pw.evaluate(expr, up).to(out.dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    if "bfloat16" in pw.dumps(expr):  # the interpreter's bf16 cast truncates (GPU: RTNE)
        tol = 1e-2
    torch.testing.assert_close(out.double(), ref32.double(), atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("p", [-3.0, -1.0, 5.0, 7.0])
def test_odd_power_keeps_the_sign_of_zero(gen_dir, p):
    """``(-0.0) ** -3`` is ``-inf`` in eager: the sign of a signed zero survives odd powers."""
    a = torch.tensor([[0.0, 2.0, -0.5], [1.5, -3.0, 0.0]])  # ACC; its negation has -0.0
    with _common.count_launches() as n:
        out = _printer_kernel_run(("pow", ("neg", "ACC"), p), {"ACC": a})
    assert n["mm_epilogue"] == 1
    ref = (-a) ** p
    torch.testing.assert_close(out, ref)
    assert torch.equal(torch.signbit(out), torch.signbit(ref))


def test_printer_cast_rounds_like_eager(gen_dir):
    # 1 + 2**-12 is not an fp16 value: the cast in the middle must round it away
    a = torch.full((2, 3), 1.0 + 2.0**-12)
    expr = ("sub", ("to", ("to", "ACC", "float16"), "float32"), 1.0)
    out = _printer_kernel_run(expr, {"ACC": a})
    assert out.dtype == torch.float32
    assert torch.equal(out, pw.evaluate(expr, {"ACC": a}))
    assert torch.equal(out, torch.zeros_like(out))


def test_dtype_rules():
    f16, f32, b = torch.float16, torch.float32, torch.bool
    d = {"ACC": f16, "IN0": f32, "IN1": b}
    assert pw.infer_dtype(("mul", "ACC", 0.5), d) == f16
    assert pw.infer_dtype(("add", "ACC", "IN0"), d) == f32
    assert pw.infer_dtype(("mul", "IN1", 2.0), d) == f32
    assert pw.infer_dtype(("gt", "ACC", 0.0), d) == b
    assert pw.infer_dtype(("where", "IN1", "ACC", 0.0), d) == f16
    assert pw.infer_dtype(("to", "IN0", "bfloat16"), d) == torch.bfloat16
    assert pw.infer_dtype(("exp", "IN1"), d) == f32
    for k in ("log1p", "expm1", "sin", "cos"):
        assert pw.infer_dtype((k, "IN1"), d) == f32
        assert pw.infer_dtype((k, "ACC"), d) == f16
    assert pw.infer_dtype(("sign", "ACC"), d) == f16
    assert pw.infer_dtype(("sign", "IN1"), d) == b
    assert pw.infer_dtype(("logical_and", "ACC", "IN1"), d) == b
    assert pw.infer_dtype(("logical_or", "ACC", 0.0), d) == b
    assert pw.infer_dtype(pa.from_aten(torch.ops.aten.hardswish.default, ["ACC"]), d) == f16
    assert pw.infer_dtype(pa.from_aten(torch.ops.aten.clamp.Tensor, ["ACC", "IN0"]), d) == f32


_PROMO = [torch.bool, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("acc", [torch.float16, torch.float32, torch.int32, torch.bool])
def test_dtype_rules_follow_eager_for_0dim_tensors(acc):
    """A 0-dim tensor promotes as in eager: it widens only a value of a lower category
    (``fp16 * fp32_0dim`` is fp16: an fp16 GEMM times a scale tensor fused as fp32 was
    refused for a dtype mismatch).  Checked against eager for every pair, in a chain
    with a Python constant, a 0-dim-only subexpression and a ``where``."""
    for other in _PROMO:
        x, z = torch.ones(2, 3, dtype=acc), torch.ones((), dtype=other)
        leaves = {"ACC": acc, "IN0": pw.ZeroDim(other), "IN1": torch.bool}
        m = torch.ones(2, 3, dtype=torch.bool)
        cases = [
            (("add", "ACC", "IN0"), torch.add(x, z)),
            (("mul", ("add", "IN0", "IN0"), "ACC"), (z + z) * x),
            (("add", ("mul", "IN0", 2.0), "ACC"), z * 2.0 + x),
            (("where", "IN1", "ACC", "IN0"), torch.where(m, x, z)),
            (("lt", "IN0", "ACC"), z < x),
        ]
        for expr, ref in cases:
            assert pw.infer_dtype(expr, leaves) == ref.dtype, (acc, other, expr)


def test_format_roundtrip_and_errors():
    s = pw.dumps(GELU_TANH)
    assert pw.loads(s) == pw.canonical(GELU_TANH)
    assert pw.dumps(("mul", "ACC", 2)) == '["mul","ACC",2.0]'
    assert pw.dumps(("to", "ACC", torch.float16)) == '["to","ACC","float16"]'
    for bad in (("frob", "ACC"), ("add", "ACC"), ("to", "ACC", "int8"), "X", ("gelu", "ACC", "x")):
        with pytest.raises(pw.ExprError):
            pw.canonical(bad)


def test_aten_mapping():
    aten = torch.ops.aten
    for op in (
        aten.add.Tensor,
        aten.mul.Tensor,
        aten.pow.Tensor_Scalar,
        aten.tanh.default,
        aten.gelu.default,
        aten.relu.default,
        aten.silu.default,
        aten.sigmoid.default,
        aten.erf.default,
        aten.exp.default,
        aten.rsqrt.default,
        aten.sub.Tensor,
        aten.div.Tensor,
        aten.neg.default,
        aten._to_copy.default,
        torch.ops.prims.convert_element_type.default,
        aten.where.self,
        aten.add.Scalar,
        aten.mul.Scalar,
    ):
        assert pa.is_pointwise(op), op
    assert not pa.is_pointwise(aten.mm.default)
    assert pa.from_aten(aten.add.Tensor, ["ACC", "IN0"], {"alpha": 2}) == (
        "add",
        "ACC",
        ("mul", "IN0", 2.0),
    )
    assert pa.from_aten(aten.gelu.default, ["ACC"], {"approximate": "tanh"}) == (
        "gelu",
        "ACC",
        "tanh",
    )
    assert pa.from_aten(aten._to_copy.default, ["ACC"], {"dtype": torch.float16}) == (
        "to",
        "ACC",
        "float16",
    )
    assert pa.from_aten(aten.rsub.Scalar, ["ACC", 1.0], {}) == ("sub", 1.0, "ACC")
    assert pa.from_aten(aten.masked_fill.Scalar, ["ACC", "IN0", 0.0], {}) == (
        "where",
        "IN0",
        0.0,
        "ACC",
    )
    with pytest.raises(pw.ExprError):
        pa.from_aten(aten.mm.default, ["ACC", "IN0"], {})
    # activations: scalars positional or by name, ATen's defaults
    assert pa.from_aten(aten.clamp.default, ["ACC"], {"max": 2}) == ("minimum", "ACC", 2.0)
    assert pa.from_aten(aten.hardtanh.default, ["ACC"]) == pa.from_aten(
        aten.clamp.default, ["ACC", -1.0, 1.0]
    )
    assert pa.from_aten(aten.leaky_relu.default, ["ACC"]) == pa.from_aten(
        aten.leaky_relu.default, ["ACC"], {"negative_slope": 0.01}
    )
    assert pa.from_aten(aten.softplus.default, ["ACC"])[0] == "where"
    with pytest.raises(pw.ExprError):  # eager raises too
        pa.from_aten(aten.clamp.default, ["ACC", None, None])
    with pytest.raises(pw.ExprError):  # eager raises: in-place backward, negative slope
        pa.from_aten(aten.leaky_relu_backward.default, ["ACC", "IN0", -0.1, True])
    with pytest.raises(pw.ExprError):  # a tensor where ATen takes a scalar
        pa.from_aten(aten.hardtanh.default, ["ACC", "IN0", 1.0])


# --- GEMM + epilogue ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)
def test_mm_epilogue_gpt2_gelu(poison, gen_dir, device, dtype, tol):
    x = torch.randn(2, 5, 24, device=device).to(dtype)
    w = torch.randn(40, 24, device=device).to(dtype)  # a Linear weight: passed as w.t()
    bias = torch.randn(40, device=device).to(dtype)
    with _common.count_launches() as n:
        out = torch.ops.tile.mm_epilogue(x, w.t(), bias, [], pw.dumps(GELU_TANH))
    assert n["mm_epilogue"] == 1
    ref = F.gelu(x.double() @ w.double().t() + bias.double(), approximate="tanh")
    assert out.shape == (2, 5, 40) and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)
def test_mm_epilogue_residual_and_swiglu(poison, gen_dir, device, dtype, tol):
    B, T, K, N = 3, 5, 16, 19
    x = torch.randn(B, T, K, device=device).to(dtype)
    w1 = torch.randn(N, K, device=device).to(dtype)
    resid = torch.randn(1, T, N, device=device).to(dtype)  # broadcast over B: not copied
    up = torch.randn(B, T, N, device=device).to(dtype)
    expr = ("mul", ("add", ("silu", "ACC"), "IN0"), "IN1")
    out = torch.ops.tile.mm_epilogue(x, w1.t(), None, [resid, up], pw.dumps(expr))
    acc = x.double() @ w1.double().t()
    ref = (F.silu(acc) + resid.double()) * up.double()
    assert out.dtype == dtype and out.shape == (B, T, N)
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)
    # an fp32 residual promotes the result to fp32, as eager does
    r32 = torch.randn(B * T, N, device=device)
    out = torch.ops.tile.mm_epilogue(
        x.reshape(B * T, K), w1.t(), None, [r32], '["add","ACC","IN0"]'
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), acc.reshape(B * T, N) + r32.double(), atol=tol * 4, rtol=tol
    )


def test_mm_epilogue_source_cache(gen_dir):
    k1 = fused_matmul.kernel_for(GELU_TANH)
    k2 = fused_matmul.kernel_for(pw.dumps(GELU_TANH))
    assert k1 is k2
    files = sorted(gen_dir.glob("mm_epilogue_*.py"))
    assert len(files) == 1
    src = files[0].read_text()
    compile(src, str(files[0]), "exec")  # readable, valid Python
    assert "def mm_epilogue_kernel" in src and pw.dumps(GELU_TANH) in src
    fused_matmul.kernel_for(("relu", "ACC"))
    assert len(list(gen_dir.glob("mm_epilogue_*.py"))) == 2


def test_mm_epilogue_fake_and_refusals(gen_dir):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(4, 8, dtype=torch.float16)
        b = torch.empty(8, 6, dtype=torch.float16)
        r = torch.empty(6, dtype=torch.float32)
        out = torch.ops.tile.mm_epilogue(a, b, None, [r], '["add","ACC","IN0"]')
        assert out.shape == (4, 6) and out.dtype == torch.float32
    a = torch.randn(4, 8)
    assert "IN0" in fused_matmul.check(a, torch.randn(8, 6), None, [], '["add","ACC","IN0"]')
    assert "broadcast" in fused_matmul.check(
        a, torch.randn(8, 6), None, [torch.randn(2, 4, 6)], '["add","ACC","IN0"]'
    )
    # refused inputs still give eager's result
    out = torch.ops.tile.mm_epilogue(
        a.double(), torch.randn(8, 6).double(), None, [], '["relu","ACC"]'
    )
    assert out.dtype == torch.float64


def test_mm_epilogue_backward_recomputes(gen_dir):
    a = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    r = torch.randn(3, 6, requires_grad=True)
    out = torch.ops.tile.mm_epilogue(a, w.t(), None, [r], '["mul",["tanh","ACC"],"IN0"]')
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [a, w, r], g)
    want = torch.autograd.grad(torch.tanh(a @ w.t()) * r, [a, w, r], g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_mm_epilogue_fault_falls_back_once(gen_dir, monkeypatch, clean_failures):
    monkeypatch.setattr(fused_matmul, "matmul_epilogue", _boom)
    a, b = torch.randn(3, 8), torch.randn(8, 5)
    with pytest.warns(RuntimeWarning, match="mm_epilogue"):
        out = torch.ops.tile.mm_epilogue(a, b, None, [], '["relu","ACC"]')
    torch.testing.assert_close(out, torch.relu(a @ b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.ops.tile.mm_epilogue(a, b, None, [], '["relu","ACC"]')


# --- scale + mask + softmax ------------------------------------------------------------------


def _masks(shape, kind, device):
    B, H, T, S = shape
    if kind == "none":
        return None
    if kind == "add":
        m = torch.randn(B, 1, T, S, device=device)
        m[..., 0, 1:] = -math.inf  # a row with one column left
        return m
    if kind == "add16":
        return torch.randn(1, 1, T, S, device=device).half()
    m = torch.rand(1, 1, T, S, device=device) > 0.6
    m[..., 1, :] = True  # a fully masked row: NaN, like eager
    return m


@pytest.mark.parametrize("kind", ["none", "add", "add16", "bool"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_scale_mask_softmax(poison, device, kind, dtype):
    shape = (2, 3, 5, 37)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    mask = _masks(shape, kind, device)
    with _common.count_launches() as n:
        y = torch.ops.tile.scale_mask_softmax(x, 0.125, mask, -1)
    assert n["scale_mask_softmax_fwd"] == 1
    xr = x.detach().double().requires_grad_()
    ref = fused_softmax.reference(
        xr, 0.125, None if mask is None else mask if mask.dtype == torch.bool else mask.double(), -1
    )
    assert y.dtype == fused_softmax.reference(x.detach(), 0.125, mask, -1).dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref.detach(), atol=tol, rtol=tol, equal_nan=True)
    if kind == "bool":
        assert y[:, :, 1].isnan().all()
    g = torch.randn_like(y)
    with _common.count_launches() as n:
        (gx,) = torch.autograd.grad(y, x, g)
    assert n["scale_mask_softmax_bwd"] == 1
    (gref,) = torch.autograd.grad(ref, xr, g.double())
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double(), gref, atol=tol, rtol=tol, equal_nan=True)


def test_scale_mask_softmax_looped_dim_and_mask_grad(poison, device):
    x = torch.randn(3, 70, 4, device=device, requires_grad=True)  # softmax over dim 1
    mask = torch.randn(1, 70, 1, device=device, requires_grad=True)
    y = fused_softmax.scale_mask_softmax_fwd(x.detach(), 2.0, mask.detach(), 1, block_n=32)
    ref = torch.softmax(x * 2.0 + mask, 1)
    torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    dx = fused_softmax.scale_mask_softmax_bwd(g, y, 2.0, 1, torch.float32, block_n=32)
    gx, gm = torch.autograd.grad(ref, [x, mask], g)
    torch.testing.assert_close(dx, gx, atol=1e-5, rtol=1e-5)
    out = torch.ops.tile.scale_mask_softmax(x, 2.0, mask, 1)
    gx2, gm2 = torch.autograd.grad(out, [x, mask], g)
    torch.testing.assert_close(gx2, gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gm2, gm, atol=1e-5, rtol=1e-5)


def test_scale_mask_softmax_fake_and_fallback(device, monkeypatch, clean_failures):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 8, dtype=torch.float16)
        y = torch.ops.tile.scale_mask_softmax(x, 1.0, torch.empty(1, 4, 8), -1)
        assert y.shape == x.shape and y.dtype == torch.float32
    x = torch.randn(2, 4, 8, device=device)
    mask = torch.rand(4, 8, device=device) > 0.5
    assert "broadcast" in fused_softmax.check(x, torch.zeros(3, 8), -1)
    monkeypatch.setattr(fused_softmax, "scale_mask_softmax_fwd", _boom)
    with pytest.warns(RuntimeWarning, match="scale_mask_softmax_fwd"):
        y = torch.ops.tile.scale_mask_softmax(x, 0.5, mask, -1)
    torch.testing.assert_close(
        y, torch.softmax((x * 0.5).masked_fill(mask, -math.inf), -1), equal_nan=True
    )


@pytest.mark.parametrize("block_n", [None, 4])  # one block per row, and looped
@pytest.mark.parametrize(
    "dtype, fill",
    [(torch.float32, -3.4e38), (torch.float16, -65504.0), (torch.float32, None)],
    ids=["fp32_min", "fp16_min", "fp32_-inf"],
)
def test_scale_mask_softmax_bias_and_fill(poison, device, block_n, dtype, fill):
    """MPT's prologue, ``softmax((x * scale + bias).masked_fill(mask, fill))``: an fp32
    bias broadcast over batch and queries, a mask broadcast over heads, an all-masked
    row (uniform with a finite fill, NaN with -inf); the gradients of x and the bias go
    through the backward kernel, which zeroes the filled entries."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 11, device=device).to(dtype).requires_grad_()
    bias = torch.randn(3, 1, 11, device=device).requires_grad_()
    m = torch.rand(2, 1, 5, 11, device=device) < 0.3
    m[1, 0, 2] = True
    with _common.count_launches() as n:
        y = fused_softmax.scale_mask_softmax_fwd(x.detach(), 0.5, m, -1, bias.detach(), fill,
                                                 block_n=block_n)  # fmt: skip
        out = torch.ops.tile.scale_mask_softmax(x, 0.5, m, -1, bias, fill)
    assert dict(n) == {"scale_mask_softmax_fwd": 1}  # the op's (the launcher is uncounted)
    xr, br = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    z = (xr * 0.5 + br).masked_fill(m, -math.inf if fill is None else fill)
    ref = torch.softmax(z, -1)
    assert y.dtype == out.dtype == torch.float32  # promoted by the fp32 bias, as eager
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got in (y, out):
        torch.testing.assert_close(got.double(), ref.detach(), atol=tol, rtol=tol, equal_nan=True)
    assert y[1, :, 2].isnan().all() == (fill is None)
    g = torch.randn_like(out)
    with _common.count_launches() as n:
        gx, gb = torch.autograd.grad(out, [x, bias], g)
    assert n["scale_mask_softmax_bwd"] == 1, dict(n)
    gxr, gbr = torch.autograd.grad(ref, [xr, br], g.double())
    assert gx.dtype == dtype and gb.dtype == torch.float32
    torch.testing.assert_close(gx.double(), gxr, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(gb.double(), gbr.nan_to_num(), atol=tol, rtol=tol)
    assert (gx[m.expand_as(gx)] == 0).all()


@pytest.mark.parametrize("block_n", [None, 4])
def test_scale_mask_softmax_two_added_tensors(poison, device, block_n):
    """T5: a position bias added first, then a float mask; gradients for all three."""
    x = torch.randn(2, 3, 5, 11, device=device, requires_grad=True)
    pb = torch.randn(1, 3, 5, 11, device=device, requires_grad=True)
    mask = torch.randn(2, 1, 1, 11, device=device, requires_grad=True)
    y = fused_softmax.scale_mask_softmax_fwd(
        x.detach(), 0.5, mask.detach(), -1, pb.detach(), block_n=block_n
    )
    ref = torch.softmax(x * 0.5 + pb + mask, -1)
    torch.testing.assert_close(y, ref.detach(), atol=1e-6, rtol=1e-5)
    with _common.count_launches() as n:
        out = torch.ops.tile.scale_mask_softmax(x, 0.5, mask, -1, pb)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, pb, mask], g)
    assert dict(n) == {"scale_mask_softmax_fwd": 1, "scale_mask_softmax_bwd": 1}, dict(n)
    for a, b in zip(got, torch.autograd.grad(ref, [x, pb, mask], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scale_mask_softmax_stores_in_the_asked_dtype(poison, device):
    """``dtype``: the fp32 probabilities stored as half, as ``softmax(...).to(half)``;
    the gradients are the cast's and the softmax's, the bias's summed in fp32."""
    x = torch.randn(2, 3, 5, 13, device=device).half().requires_grad_()
    bias = torch.randn(3, 1, 13, device=device).requires_grad_()
    m = torch.rand(2, 1, 5, 13, device=device) < 0.3
    with _common.count_launches() as n:
        y = torch.ops.tile.scale_mask_softmax(x, 0.5, m, -1, bias, -65504.0, torch.float16)
    assert dict(n) == {"scale_mask_softmax_fwd": 1} and y.dtype == torch.float16
    xr, br = x.detach().float().requires_grad_(), bias.detach().clone().requires_grad_()
    ref = torch.softmax((xr.half() * 0.5 + br).masked_fill(m, -65504.0), -1).half()
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)
    g = torch.randn_like(y)
    with _common.count_launches() as n:
        gx, gb = torch.autograd.grad(y, [x, bias], g)
    assert dict(n) == {"scale_mask_softmax_bwd": 1} and gx.dtype == torch.float16
    gxr, gbr = torch.autograd.grad(ref, [xr, br], g)
    torch.testing.assert_close(gx.float(), gxr, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gb, gbr, atol=2e-3, rtol=2e-3)
    assert "result dtype" in fused_softmax._dtype_reason(torch.float64)


def test_scale_mask_softmax_bias_refusals(device):
    x = torch.randn(2, 4, 8, device=device)
    m = torch.rand(4, 8, device=device) < 0.5
    check = fused_softmax.check
    assert "broadcast" in check(x, m, -1, torch.zeros(3, 8, device=device), None)
    assert check(x, torch.zeros(4, 8, device=device), -1, x, None) is None  # two added
    assert "without a bool mask" in check(x, None, -1, None, -1e4)
    assert "bias: " in check(x, m, -1, torch.zeros(8, dtype=torch.int32, device=device), None)
    assert check(x, m, -1, torch.zeros(8, dtype=torch.float16, device=device), -1e4) is None


# --- residual add + norms ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("looped", [False, True])
def test_add_layer_norm(poison, device, monkeypatch, dtype, tol, looped):
    if looped:
        monkeypatch.setattr(
            fused_norm, "_CONFIGS", (fused_norm.Config.make(num_warps=4, num_stages=1, BLOCK_N=16),)
        )
    x = torch.randn(3, 4, 37, device=device).to(dtype).requires_grad_()
    r = torch.randn(3, 4, 37, device=device).to(dtype).requires_grad_()
    w = torch.randn(37, device=device).to(dtype).requires_grad_()
    b = torch.randn(37, device=device).to(dtype).requires_grad_()
    with _common.count_launches() as n:
        out, s, mean, rstd = torch.ops.tile.add_layer_norm(x, r, [37], w, b, 1e-5)
    assert n["add_layer_norm_fwd"] == 1
    s_ref = x + r
    if dtype == torch.bfloat16:  # the interpreter's bf16 cast truncates (GPU: exact)
        torch.testing.assert_close(s, s_ref, atol=0, rtol=2**-7)
    else:
        assert torch.equal(s, s_ref)
    ref = F.layer_norm(s_ref.double(), [37], w.double(), b.double(), 1e-5)
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)
    assert mean.shape == rstd.shape == (3, 4, 1) and rstd.dtype == torch.float32
    g, gs = torch.randn_like(out), torch.randn_like(s)
    with _common.count_launches() as n:
        got = torch.autograd.grad((out * g).sum() + (s * gs).sum(), [x, r, w, b])
    assert n["layer_norm_bwd"] == 1
    s2 = x + r
    want = torch.autograd.grad(
        (F.layer_norm(s2.float(), [37], w.float(), b.float(), 1e-5) * g.float()).sum()
        + (s2 * gs).sum(),
        [x, r, w, b],
    )
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p.double(), q.double(), atol=tol * 20, rtol=tol * 4)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"]
)
@pytest.mark.parametrize("has_w", [True, False])
def test_add_rms_norm(poison, device, dtype, tol, has_w):
    x = torch.randn(6, 29, device=device).to(dtype).requires_grad_()
    r = torch.randn(6, 29, device=device).to(dtype).requires_grad_()
    w = torch.randn(29, device=device).to(dtype).requires_grad_() if has_w else None
    with _common.count_launches() as n:
        out, s, rstd = torch.ops.tile.add_rms_norm(x, r, [29], w, None)
    assert n["add_rms_norm_fwd"] == 1
    s2 = x + r
    assert torch.equal(s, s2)
    ref = F.rms_norm(s2.float(), [29], None if w is None else w.float())
    torch.testing.assert_close(out.double(), ref.double(), atol=tol * 4, rtol=tol)
    g, gs = torch.randn_like(out), torch.randn_like(s)
    params = [x, r] + ([w] if has_w else [])
    got = torch.autograd.grad((out * g).sum() + (s * gs).sum(), params)
    want = torch.autograd.grad((ref * g.float()).sum() + (s2 * gs).sum(), params)
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p.double(), q.double(), atol=tol * 20, rtol=tol * 4)


def test_add_norm_fake_and_fallback(device, monkeypatch, clean_failures):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8, dtype=torch.bfloat16)
        out, s, mean, rstd = torch.ops.tile.add_layer_norm(x, x, [8], None, None, 1e-5)
        assert out.shape == s.shape == x.shape and mean.shape == (2, 3, 1)
        out, s, rstd = torch.ops.tile.add_rms_norm(x, x, [8], None, 1e-6)
        assert rstd.dtype == torch.float32
    x, r = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    assert "residual" in fused_norm.check_add_layer_norm(x, r.half(), [8])
    monkeypatch.setattr(fused_norm, "add_norm_fwd", _boom)
    with pytest.warns(RuntimeWarning, match="add_layer_norm_fwd"):
        out, s, _m, _r = torch.ops.tile.add_layer_norm(x, r, [8], None, None, 1e-5)
    torch.testing.assert_close(out, F.layer_norm(x + r, [8]))
    with pytest.warns(RuntimeWarning, match="add_rms_norm_fwd"):
        out, s, _r = torch.ops.tile.add_rms_norm(x, r, [8], None, None)
    torch.testing.assert_close(out, F.rms_norm(x + r, [8]))


def test_pointwise_module_exports():
    assert set(pointwise.__all__) <= set(dir(pointwise))


@pytest.mark.parametrize("block_n", [4, 16])  # looped (4 < 9) and one block per row
def test_scale_mask_softmax_nan_row_is_nan(poison, device, block_n):
    """A NaN makes its row NaN, as eager's; the looped max must not drop it (a GPU's
    ``max`` ignores NaN unless asked to propagate it)."""
    x = torch.randn(3, 9, device=device)
    x[1, 4] = float("nan")
    mask = torch.zeros(1, 9, device=device)
    y = fused_softmax.scale_mask_softmax_fwd(x, 0.5, mask, -1, block_n=block_n)
    torch.testing.assert_close(y, torch.softmax(x * 0.5 + mask, -1), equal_nan=True)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


# --- GEMM + epilogue with several results (tile::mm_epilogue_multi) -------------------------

_GELU_INNER = GELU_TANH[2][1][1]  # sqrt(2 / pi) * (ACC + 0.044715 * ACC ** 3)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)
@pytest.mark.parametrize("M", [1, 7, 13])
def test_mm_epilogue_multi_writes_every_result(poison, gen_dir, device, dtype, tol, M):
    """GPT-2's training forward: the sink and what the backward saves (the GEMM result,
    ``0.5 * h``, the tanh, ``1 + tanh``), plus a bool mask and an fp16 cast."""
    from tilebackend.codegen import fused_matmul_multi

    K, N = 19, 17
    x = torch.randn(M, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    resid = torch.randn(1, N, device=device).to(dtype)
    exprs = [
        ("add", GELU_TANH, "IN0"),
        "ACC",
        ("mul", "ACC", 0.5),
        ("tanh", _GELU_INNER),
        ("gt", "ACC", 0.0),
    ]
    with _common.count_launches() as n:
        outs = torch.ops.tile.mm_epilogue_multi(
            x, w.t(), bias, [resid], [pw.dumps(e) for e in exprs]
        )
    assert dict(n) == {"mm_epilogue_multi": 1}, dict(n)
    h = x.double() @ w.double().t() + bias.double()
    refs = [
        F.gelu(h, approximate="tanh") + resid.double(),
        h,
        0.5 * h,
        torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)),
    ]
    assert len(outs) == 5
    for out, ref in zip(outs, refs):
        assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)
    mask = outs[4]
    assert mask.dtype == torch.bool and mask.shape == (M, N)
    near_zero = outs[1].double().abs() < tol  # where rounding may flip the sign
    assert torch.equal(mask[~near_zero], (h > 0)[~near_zero])
    # the reference (the fallback) computes the same results
    ref_outs = fused_matmul_multi.reference(x, w.t(), bias, [resid], [pw.dumps(e) for e in exprs])
    assert [o.dtype for o in ref_outs] == [o.dtype for o in outs]


def test_mm_epilogue_multi_cast_result_and_n_d_input(poison, gen_dir, device):
    """An fp16 cast as a result of an fp32 GEMM (its own dtype), over a 3-D input."""
    x = torch.randn(2, 7, 16, device=device)
    w = torch.randn(17, 16, device=device)
    exprs = [("relu", "ACC"), ("to", "ACC", "float16"), ("to", ("sigmoid", "ACC"), "float16")]
    outs = torch.ops.tile.mm_epilogue_multi(x, w.t(), None, [], [pw.dumps(e) for e in exprs])
    h = x @ w.t()
    assert [o.dtype for o in outs] == [torch.float32, torch.float16, torch.float16]
    assert all(o.shape == (2, 7, 17) for o in outs)
    torch.testing.assert_close(outs[0], torch.relu(h), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1], h.half(), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(outs[2], torch.sigmoid(h).half(), atol=1e-3, rtol=1e-3)


def test_mm_epilogue_multi_source_shares_subtrees(gen_dir):
    from tilebackend.codegen import fused_matmul_multi

    exprs = [GELU_TANH, "ACC", ("tanh", _GELU_INNER)]
    k1 = fused_matmul_multi.kernel_for(exprs)
    k2 = fused_matmul_multi.kernel_for([pw.dumps(e) for e in exprs])
    assert k1 is k2
    (path,) = gen_dir.glob("mm_epilogue_multi_*.py")
    src = path.read_text()
    compile(src, str(path), "exec")
    assert "def mm_epilogue_multi_kernel" in src and "out2_ptr" in src and "out3_ptr" not in src
    # the tanh is printed once per epilogue, shared by the sink and the third result:
    # each main loop (the persistent TMA one and the other) holds the epilogue of the
    # whole tile and, for EPI_SPLIT, that of each column half
    assert src.count("tl.exp(-2.0 * tl.abs(") == 2 * 3, src


def test_mm_epilogue_multi_refusals_and_grad(device):
    from tilebackend.codegen import fused_matmul_multi

    x = torch.randn(5, 8, device=device)
    w = torch.randn(8, 6, device=device)
    one = pw.dumps(("relu", "ACC"))
    assert "expects 2 to 5" in fused_matmul_multi.check(x, w, None, [], [one])
    assert "expects 2 to 5" in fused_matmul_multi.check(x, w, None, [], [one] * 6)
    assert "IN0" in fused_matmul_multi.check(x, w, None, [], [one, '["add","ACC","IN0"]'])
    # float64 is refused: the op computes the reference
    outs = torch.ops.tile.mm_epilogue_multi(x.double(), w.double(), None, [], [one, '"ACC"'])
    torch.testing.assert_close(outs[1], x.double() @ w.double())
    # autograd through every result
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    outs = torch.ops.tile.mm_epilogue_multi(xg, wg, None, [], [one, '["mul","ACC",3.0]'])
    (outs[0].sum() + outs[1].square().sum()).backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    h = xr @ wr
    (torch.relu(h).sum() + (3.0 * h).square().sum()).backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wg.grad, wr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "op, kwargs, saved",
    [
        (torch.ops.aten.gelu_backward.default, {}, lambda x: x),
        (torch.ops.aten.gelu_backward.default, {"approximate": "tanh"}, lambda x: x),
        (torch.ops.aten.tanh_backward.default, {}, torch.tanh),
        (torch.ops.aten.sigmoid_backward.default, {}, torch.sigmoid),
        (torch.ops.aten.silu_backward.default, {}, lambda x: x),
    ],
    ids=["gelu_bwd", "gelu_tanh_bwd", "tanh_bwd", "sigmoid_bwd", "silu_bwd"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_ops_written_out_match_aten(poison, gen_dir, op, kwargs, saved, dtype):
    """Activation backwards (what a backward graph applies to the dgrad GEMM's result)
    become expressions: through the generated kernel they match ATen's own op."""
    grad = torch.randn(7, 13).to(dtype)
    other = saved(torch.randn(7, 13) * 3).to(dtype)
    expr = pa.from_aten(op, ["ACC", "IN0"], kwargs)
    with _common.count_launches() as n:
        out = _printer_kernel_run(expr, {"ACC": grad, "IN0": other})
    assert n["mm_epilogue"] == 1  # the generated kernel ran, not the ATen fallback
    ref = op(grad.double(), other.double(), **kwargs).to(dtype)
    assert out.dtype == op(grad, other, **kwargs).dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


_A = torch.ops.aten
#: (id, op, args, kwargs, saved): tensors as leaves, ``ACC`` the GEMM result (the forward
#: activation's input, or a backward's output gradient), ``IN0`` a saved tensor made by
#: ``saved`` from values at / around the thresholds, ``IN1`` another tensor
ACTIVATION_OPS = [
    ("clamp", _A.clamp.default, ["ACC", -0.5, 2.0], {}, None),
    ("clamp_max_only", _A.clamp.default, ["ACC"], {"max": 1.5}, None),
    ("clamp_min_only", _A.clamp.default, ["ACC", -1.0], {}, None),
    ("clamp_tensor", _A.clamp.Tensor, ["ACC", "IN0"], {"max": "IN1"}, None),
    ("hardtanh", _A.hardtanh.default, ["ACC"], {}, None),
    ("hardtanh_2_3", _A.hardtanh.default, ["ACC", -2.0, 3.0], {}, None),
    ("leaky_relu", _A.leaky_relu.default, ["ACC"], {}, None),
    ("leaky_relu_0.2", _A.leaky_relu.default, ["ACC", 0.2], {}, None),
    ("elu", _A.elu.default, ["ACC"], {}, None),
    ("elu_selu", _A.elu.default, ["ACC", 1.6732632423543772, 1.0507009873554805, 1.0], {}, None),
    ("elu_input_scale", _A.elu.default, ["ACC", 1.5, 1.0, 0.5], {}, None),
    ("softplus", _A.softplus.default, ["ACC"], {}, None),
    ("softplus_beta2_thr5", _A.softplus.default, ["ACC", 2.0, 5.0], {}, None),
    ("hardswish", _A.hardswish.default, ["ACC"], {}, None),
    ("hardsigmoid", _A.hardsigmoid.default, ["ACC"], {}, None),
    ("mish", _A.mish.default, ["ACC"], {}, None),
    ("log1p", _A.log1p.default, ["ACC"], {}, None),
    ("expm1", _A.expm1.default, ["ACC"], {}, None),
    ("sin", _A.sin.default, ["ACC"], {}, None),
    ("cos", _A.cos.default, ["ACC"], {}, None),
    ("sign", _A.sign.default, ["ACC"], {}, None),
    ("logical_and", _A.logical_and.default, ["ACC", "IN0"], {}, None),
    ("logical_or", _A.logical_or.default, ["ACC", "IN0"], {}, None),
    ("hardtanh_bwd", _A.hardtanh_backward.default, ["ACC", "IN0", -1.0, 1.0], {}, None),
    ("leaky_relu_bwd", _A.leaky_relu_backward.default, ["ACC", "IN0", 0.01, False], {}, None),
    (
        "leaky_relu_bwd_result",
        _A.leaky_relu_backward.default,
        ["ACC", "IN0", 0.2, True],
        {},
        lambda s: _A.leaky_relu.default(s, 0.2),
    ),
    ("elu_bwd", _A.elu_backward.default, ["ACC", 1.0, 1.0, 1.0, False, "IN0"], {}, None),
    (
        "elu_bwd_result",
        _A.elu_backward.default,
        ["ACC", 1.5, 1.0507, 0.5, True, "IN0"],
        {},
        lambda s: _A.elu.default(s, 1.5, 1.0507, 0.5),
    ),
    ("hardswish_bwd", _A.hardswish_backward.default, ["ACC", "IN0"], {}, None),
    ("hardsigmoid_bwd", _A.hardsigmoid_backward.default, ["ACC", "IN0"], {}, None),
    ("softplus_bwd", _A.softplus_backward.default, ["ACC", "IN0", 1.0, 20.0], {}, None),
    ("softplus_bwd_beta2", _A.softplus_backward.default, ["ACC", "IN0", 2.0, 5.0], {}, None),
    ("mish_bwd", _A.mish_backward.default, ["ACC", "IN0"], {}, None),
]
# values at and around the ops' thresholds (19 = N: one exact GEMM row, one saved row)
_EDGES = [-25.0, -20.0, -6.0, -3.0, -2.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
_EDGES += [6.0, 10.0, 20.0, 25.0]


@pytest.mark.parametrize(
    "op, args, kwargs, saved",
    [c[1:] for c in ACTIVATION_OPS],
    ids=[c[0] for c in ACTIVATION_OPS],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_activation_ops_in_gemm_epilogue_match_aten(
    poison, gen_dir, op, args, kwargs, saved, dtype
):
    """Each activation (and its backward) from ``from_aten`` runs as the generated GEMM
    epilogue (odd sizes) and matches the ATen op applied to the eager GEMM result."""
    M, K, N = 13, 17, 19
    a = torch.randn(M, K) * 0.7
    b = torch.randn(K, N)
    a[:, 0] = 0.0
    a[1] = 0.0
    a[1, 0] = 1.0  # row 1 of the result is b[0] exactly: the threshold values
    b[0] = torch.tensor(_EDGES)
    a[0] = float("nan")  # a NaN row
    s = torch.randn(M, N) * 4
    s[1] = torch.tensor(_EDGES)  # the saved tensor at the thresholds (not NaN: for a NaN
    s[2, ::2] = 0.0  # saved input ATen's CPU vector and scalar paths disagree)
    if saved is not None:
        s = saved(s)
    s1 = torch.randn(M, N) + 1.0
    a, b, s, s1 = (t.to(dtype) for t in (a, b, s, s1))
    expr = pa.from_aten(op, args, kwargs)
    extras = [s, s1][: len(pw.input_leaves(expr) - {"ACC"})]
    is_bool = pw.infer_dtype(expr, {"ACC": dtype, "IN0": dtype, "IN1": dtype}) == torch.bool
    if is_bool:  # the GEMM kernels store float results: read the bool as 0.0 / 1.0
        expr = ("to", expr, "float32")
    with _common.count_launches() as n:
        out = torch.ops.tile.mm_epilogue(a, b, None, extras, pw.dumps(expr))
    assert n["mm_epilogue"] == 1  # the generated kernel ran, not the ATen fallback

    def call(acc, ins):
        env = {"ACC": acc, "IN0": ins[0], "IN1": ins[1]}
        sub = [env.get(v, v) if isinstance(v, str) else v for v in args]
        return op(
            *sub, **{k: env.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
        )

    eager = call((a.double() @ b.double()).to(dtype), [s, s1])
    assert out.shape == (M, N)
    ref = call(a.double() @ b.double(), [s.double(), s1.double()])
    if is_bool:
        assert eager.dtype == ref.dtype == torch.bool
        assert torch.equal(out, ref.float())
        return
    assert out.dtype == eager.dtype
    assert out[2:].isfinite().any()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(
        out.double(), ref.to(dtype).double(), atol=tol, rtol=tol, equal_nan=True
    )


def test_relu_backward_written_out_matches_aten(poison, gen_dir):
    grad, x = torch.randn(7, 13), torch.randn(7, 13)
    x[0, :3] = 0.0  # at the threshold: ReLU's gradient is 0 there
    op = torch.ops.aten.threshold_backward.default
    expr = pa.from_aten(op, ["ACC", "IN0", 0])
    with _common.count_launches() as n:
        out = _printer_kernel_run(expr, {"ACC": grad, "IN0": x})
    assert n["mm_epilogue"] == 1
    torch.testing.assert_close(out, op(grad, x, 0))


@pytest.mark.parametrize("cfg", fused_norm.ROWS_CONFIGS, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize(
    "m, n, affine",
    [(37, 29, True), (5, 1, True), (9, 1024, False), (16, 100, True)],
    ids=str,
)
def test_add_norm_several_rows_per_program(poison, device, cfg, rms, m, n, affine):
    """The multi-row kernel (ROWS rows per program; timed on a GPU for many short rows),
    forced: rows not a multiple of ROWS, a one-element row, a full block, strided x."""
    base = torch.randn(m, n + 3, device=device)
    x = base[:, :n]  # row stride n + 3
    r = torch.randn(m, n, device=device)
    w = torch.randn(n, device=device) if affine else None
    b = torch.randn(n, device=device) if affine and not rms else None
    # (the launcher itself: no ATen fallback behind it; poisoned outputs catch a gap)
    out, s, mean, rstd = fused_norm.add_norm_fwd(x, r, [n], w, b, 1e-5, rms=rms, config=cfg)
    s_ref = x + r
    assert torch.equal(s, s_ref)
    if rms:
        ref = F.rms_norm(s_ref.double(), [n], None if w is None else w.double(), 1e-5)
    else:
        wd = None if w is None else w.double()
        ref = F.layer_norm(s_ref.double(), [n], wd, None if b is None else b.double(), 1e-5)
        torch.testing.assert_close(mean.double().squeeze(-1), s_ref.double().mean(-1))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    var = s_ref.double().pow(2).mean(-1) if rms else s_ref.double().var(-1, unbiased=False)
    torch.testing.assert_close(rstd.double().squeeze(-1), (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)


def test_add_norm_multi_row_configs_only_for_many_short_rows():
    many, short = fused_norm.MANY_ROWS, fused_norm.ROWS_CONFIGS[0]["BLOCK_N"]
    assert set(fused_norm.ROWS_CONFIGS) <= set(fused_norm._space(many, 768))
    assert not set(fused_norm.ROWS_CONFIGS) & set(fused_norm._space(many - 1, 768))
    assert not set(fused_norm.ROWS_CONFIGS) & set(fused_norm._space(many, short + 1))


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("rshape", [(1, 5, 24), (5, 24), (24,)], ids=str)
@pytest.mark.parametrize("cfg", [None, fused_norm.ROWS_CONFIGS[1]], ids=["one_row", "rows"])
def test_add_norm_residual_broadcast_over_leading_dims(poison, device, rms, rshape, cfg):
    """BERT's embeddings: ``layer_norm(x + position_embeddings)`` with the residual
    ``[1, S, H]`` repeated over the batch (row i adds residual row i % S)."""
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    r = torch.randn(*rshape, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    assert fused_norm.check_add_layer_norm(x, r, [24], w) is None
    if cfg is not None:
        with torch.no_grad():
            out, s, _, _ = fused_norm.add_norm_fwd(x, r, [24], w, None, 1e-5, rms, config=cfg)
    else:
        with _common.count_launches() as n:
            if rms:
                out, s, _ = torch.ops.tile.add_rms_norm(x, r, [24], w, 1e-5)
            else:
                out, s, _, _ = torch.ops.tile.add_layer_norm(x, r, [24], w, None, 1e-5)
        assert n == {f"add_{'rms' if rms else 'layer'}_norm_fwd": 1}, n
    s_ref = x + r
    norm = F.rms_norm if rms else F.layer_norm
    ref = norm(s_ref, [24], w, eps=1e-5)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if cfg is None:  # the op's autograd reduces the residual's gradient to its shape
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum() + s.sum(), [x, r, w])
        want = torch.autograd.grad((ref * g).sum() + s_ref.sum(), [x, r, w])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_add_norm_rejects_other_broadcasts(device):
    x = torch.randn(3, 5, 24, device=device)
    assert "broadcast" in fused_norm.check_add_layer_norm(x, torch.randn(3, 1, 24), [24])
    assert "broadcast" in fused_norm.check_add_layer_norm(x, torch.randn(1, 24), [5, 24])
