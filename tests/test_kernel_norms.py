"""LayerNorm / RMSNorm tile kernels and their ``tile::`` custom ops, against eager ATen."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from tilebackend.codegen import _common
from tilebackend.codegen import layer_norm as LN
from tilebackend.codegen import rms_norm as RN
from tilebackend.codegen.autotune import Config

EPS = 1e-5

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]

#: A block far smaller than the rows below, so every row takes the looped path.
SMALL_BLOCK = (Config.make(num_warps=4, num_stages=1, BLOCK_N=16),)


def _identity(t):
    return t


def _row_step(t):  # rows 0, 2, 4, ...: a view with a row stride of 2 * N
    return t[::2]


def _col_step(t):  # normalized dim with stride 2: the launcher makes a contiguous copy
    return t[..., ::2]


def _swap_leading(t):  # leading dims transposed: cannot be folded into one row stride
    return t.transpose(0, 1)


# (id, storage shape, normalized_shape, weight?, bias?, view of the storage)
CASES = [
    ("7x13-wb", (7, 13), (13,), True, True, _identity),
    ("3x5x17-last2-w", (3, 5, 17), (5, 17), True, False, _identity),
    ("3x5x17-b", (3, 5, 17), (17,), False, True, _identity),
    ("6x1-none", (6, 1), (1,), False, False, _identity),
    ("1d", (11,), (11,), True, True, _identity),
    ("rowstep", (10, 13), (13,), True, True, _row_step),
    ("colstep", (5, 26), (13,), True, True, _col_step),
    ("swap-leading", (4, 3, 13), (13,), True, True, _swap_leading),
]
CASE_PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]


def _make(storage, ns, has_w, has_b, view, dtype, device, scale=1.0):
    x = view(torch.randn(storage, device=device) * scale + 0.5).to(dtype)
    w = (torch.randn(ns, device=device) * 0.5 + 1.0).to(dtype) if has_w else None
    b = (torch.randn(ns, device=device) * 0.5).to(dtype) if has_b else None
    return x, w, b


def _f32(t):
    return None if t is None else t.detach().float()


def _close(actual, expected, atol, rtol, scale=1.0):
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale, equal_nan=False
    )


def _ref_layer_norm(x, ns, w, b):
    """fp32 ATen forward on upcast inputs: (out, mean, rstd)."""
    return torch.ops.aten.native_layer_norm(_f32(x), list(ns), _f32(w), _f32(b), EPS)


def _ref_rms_norm(x, ns, w, eps=EPS):
    """fp32 eager forward on upcast inputs: (out, rstd)."""
    xf = _f32(x)
    dims = list(range(x.dim() - len(ns), x.dim()))
    e = torch.finfo(torch.float32).eps if eps is None else eps
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + e)
    out = xf * rstd
    return (out * _f32(w) if w is not None else out), rstd


# --- layer norm: forward ----------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("storage, ns, has_w, has_b, view", CASE_PARAMS)
def test_layer_norm_fwd(poison, device, dtype, atol, rtol, storage, ns, has_w, has_b, view):
    x, w, b = _make(storage, ns, has_w, has_b, view, dtype, device)
    with _common.count_launches() as launches:
        out, mean, rstd = torch.ops.tile.layer_norm(x, list(ns), w, b, EPS)
    assert launches["layer_norm_fwd"] == 1
    e_out, e_mean, e_rstd = torch.ops.aten.native_layer_norm(x, list(ns), w, b, EPS)
    for got, exp in ((out, e_out), (mean, e_mean), (rstd, e_rstd)):
        assert got.shape == exp.shape and got.dtype == exp.dtype
    assert out.is_contiguous()
    r_out, r_mean, r_rstd = _ref_layer_norm(x, ns, w, b)
    _close(out, r_out, atol, rtol, scale=4)
    _close(mean, r_mean, atol, rtol)
    _close(rstd, r_rstd, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm_fwd_looped(poison, device, monkeypatch, dtype, atol, rtol):
    """Rows longer than the block: Welford pass + normalize pass."""
    monkeypatch.setattr(LN, "_FWD_CONFIGS", SMALL_BLOCK)
    x, w, b = _make((5, 3, 37), (3, 37), True, True, _identity, dtype, device, scale=3.0)
    with _common.count_launches() as launches:
        out, mean, rstd = torch.ops.tile.layer_norm(x, [3, 37], w, b, EPS)
    assert launches["layer_norm_fwd"] == 1
    r_out, r_mean, r_rstd = _ref_layer_norm(x, (3, 37), w, b)
    _close(out, r_out, atol, rtol, scale=4)
    _close(mean, r_mean, atol, rtol)
    _close(rstd, r_rstd, atol, rtol)


def test_layer_norm_long_row(poison, device):
    """N = 9001 (prime, > the largest block) with the default configs: looped fwd and bwd."""
    x, w, b = _make((2, 9001), (9001,), True, True, _identity, torch.float32, device)
    with _common.count_launches() as launches:
        out, mean, rstd = torch.ops.tile.layer_norm(x, [9001], w, b, EPS)
        gy = torch.randn_like(x)
        dx, dw, db = torch.ops.tile.layer_norm_backward(
            gy, x, [9001], mean, rstd, w, b, [True, True, True]
        )
    assert launches == {"layer_norm_fwd": 1, "layer_norm_bwd": 1}
    e = torch.ops.aten.native_layer_norm(x, [9001], w, b, EPS)
    for got, exp in zip((out, mean, rstd), e, strict=True):
        _close(got, exp, 1e-5, 1e-5)
    eg = torch.ops.aten.native_layer_norm_backward(gy, x, [9001], e[1], e[2], w, b, [True] * 3)
    for got, exp in zip((dx, dw, db), eg, strict=True):
        _close(got, exp, 1e-4, 1e-4)


@pytest.mark.parametrize("shape, ns", [((0, 5), (5,)), ((2, 0, 7), (7,)), ((0, 3, 4), (3, 4))])
def test_layer_norm_zero_rows(poison, device, shape, ns):
    x = torch.randn(shape, device=device)
    w, b = torch.randn(ns, device=device), torch.randn(ns, device=device)
    out, mean, rstd = torch.ops.tile.layer_norm(x, list(ns), w, b, EPS)
    e = torch.ops.aten.native_layer_norm(x, list(ns), w, b, EPS)
    for got, exp in zip((out, mean, rstd), e, strict=True):
        assert got.shape == exp.shape and got.dtype == exp.dtype
    gy = torch.randn(shape, device=device)
    dx, dw, db = torch.ops.tile.layer_norm_backward(gy, x, list(ns), mean, rstd, w, b, [True] * 3)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_stats_dtype_matches_aten_and_fake(device, dtype):
    """mean / rstd dtype: the input dtype on CPU, fp32 on CUDA; real == fake == ATen."""
    x = torch.randn(3, 8, device=device).to(dtype)
    _, mean, rstd = torch.ops.tile.layer_norm(x, [8], None, None, EPS)
    _, e_mean, e_rstd = torch.ops.aten.native_layer_norm(x, [8], None, None, EPS)
    assert mean.dtype == e_mean.dtype == LN.stats_dtype(x)
    assert rstd.dtype == e_rstd.dtype
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        f_out, f_mean, f_rstd = torch.ops.tile.layer_norm(fx, [8], None, None, EPS)
    assert f_mean.dtype == mean.dtype and f_mean.shape == mean.shape
    assert f_out.dtype == dtype


# --- layer norm: backward ---------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "storage, ns, has_w, has_b, view",
    [p for p in CASE_PARAMS if p.id in ("7x13-wb", "3x5x17-last2-w", "6x1-none", "swap-leading")],
)
@pytest.mark.parametrize("looped", [False, True], ids=["single", "looped"])
def test_layer_norm_bwd(
    poison, device, monkeypatch, dtype, atol, rtol, storage, ns, has_w, has_b, view, looped
):
    if looped:
        monkeypatch.setattr(LN, "_BWD_CONFIGS", SMALL_BLOCK)
    x, w, b = _make(storage, ns, has_w, has_b, view, dtype, device)
    gy = torch.randn(x.shape, device=device).to(dtype)
    _, mean, rstd = _ref_layer_norm(x, ns, w, b)  # fp32 stats of the same (rounded) input
    mask = [True, has_w, has_b]
    with _common.count_launches() as launches:
        dx, dw, db = torch.ops.tile.layer_norm_backward(gy, x, list(ns), mean, rstd, w, b, mask)
    assert launches["layer_norm_bwd"] == 1
    e = torch.ops.aten.native_layer_norm_backward(
        _f32(gy), _f32(x), list(ns), mean, rstd, _f32(w), _f32(b), mask
    )
    _close(dx, e[0], atol, rtol, scale=8)
    assert dx.dtype == dtype
    for got, exp, p in ((dw, e[1], w), (db, e[2], b)):
        if p is None:
            assert got.shape == (0,)
        else:
            assert got.dtype == dtype and got.shape == p.shape
            _close(got, exp, atol, rtol, scale=8)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, True], [False, False, True]])
def test_layer_norm_bwd_mask(poison, device, mask):
    x, w, b = _make((6, 10), (10,), True, True, _identity, torch.float32, device)
    gy = torch.randn_like(x)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [10], w, b, EPS)
    res = torch.ops.tile.layer_norm_backward(gy, x, [10], mean, rstd, w, b, mask)
    e = torch.ops.aten.native_layer_norm_backward(gy, x, [10], mean, rstd, w, b, mask)
    for on, got, exp in zip(mask, res, e, strict=True):
        if on:
            _close(got, exp, 1e-5, 1e-5)
        else:
            assert got.shape == (0,)  # masked-off entries are empty tensors


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("has_w, has_b", [(True, True), (True, False), (False, False)])
def test_layer_norm_autograd(poison, device, dtype, atol, rtol, has_w, has_b):
    x, w, b = _make((4, 3, 19), (19,), has_w, has_b, _identity, dtype, device)
    gy = torch.randn(x.shape, device=device).to(dtype)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    with _common.count_launches() as launches:
        out = torch.ops.tile.layer_norm(x, [19], w, b, EPS)[0]
        grads = torch.autograd.grad(out, leaves, gy)
    assert launches == {"layer_norm_fwd": 1, "layer_norm_bwd": 1}
    rx, rw, rb = (None if t is None else _f32(t).requires_grad_() for t in (x, w, b))
    ref_leaves = [t for t in (rx, rw, rb) if t is not None]
    ref_out = F.layer_norm(rx, [19], rw, rb, EPS)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, _f32(gy))
    _close(out, ref_out, atol, rtol, scale=4)
    for got, exp, leaf in zip(grads, ref_grads, leaves, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        _close(got, exp, atol, rtol, scale=8)


# --- rms norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("storage, ns, has_w, _has_b, view", CASE_PARAMS)
def test_rms_norm_fwd(poison, device, dtype, atol, rtol, storage, ns, has_w, _has_b, view):
    x, w, _ = _make(storage, ns, has_w, False, view, dtype, device)
    with _common.count_launches() as launches:
        out, rstd = torch.ops.tile.rms_norm(x, list(ns), w, EPS)
    assert launches["rms_norm_fwd"] == 1
    eager = F.rms_norm(x, list(ns), w, EPS)
    assert out.dtype == eager.dtype == dtype and out.shape == x.shape
    assert rstd.dtype == torch.float32
    assert rstd.shape == tuple(x.shape[: x.dim() - len(ns)]) + (1,) * len(ns)
    if hasattr(torch.ops.aten, "_fused_rms_norm"):
        _, e_rstd = torch.ops.aten._fused_rms_norm(x, list(ns), w, EPS)
        assert rstd.dtype == e_rstd.dtype and rstd.shape == e_rstd.shape
    r_out, r_rstd = _ref_rms_norm(x, ns, w)
    _close(out, r_out, atol, rtol, scale=4)
    _close(rstd, r_rstd, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rms_norm_eps_none_and_looped(poison, device, monkeypatch, dtype, atol, rtol):
    """eps=None is the fp32 epsilon (as ATen); tiny inputs make the choice visible."""
    monkeypatch.setattr(RN, "_FWD_CONFIGS", SMALL_BLOCK)
    x = (torch.randn(6, 41, device=device) * 1e-3).to(dtype)
    with _common.count_launches() as launches:
        out, rstd = torch.ops.tile.rms_norm(x, [41], None, None)
    assert launches["rms_norm_fwd"] == 1
    r_out, r_rstd = _ref_rms_norm(x, (41,), None, eps=None)
    _close(out, r_out, atol, rtol, scale=4)
    _close(rstd, r_rstd, atol, rtol)
    _close(out, F.rms_norm(x.float(), [41]), atol, rtol, scale=4)


def test_rms_norm_zero_rows(poison, device):
    x = torch.randn(0, 3, 8, device=device)
    w = torch.randn(8, device=device)
    out, rstd = torch.ops.tile.rms_norm(x, [8], w, EPS)
    assert out.shape == x.shape and rstd.shape == (0, 3, 1)
    dx, dw = torch.ops.tile.rms_norm_backward(torch.randn_like(x), x, [8], rstd, w, [True, True])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "storage, ns, has_w, _has_b, view",
    [p for p in CASE_PARAMS if p.id in ("7x13-wb", "3x5x17-last2-w", "6x1-none", "colstep")],
)
@pytest.mark.parametrize("looped", [False, True], ids=["single", "looped"])
def test_rms_norm_bwd(
    poison, device, monkeypatch, dtype, atol, rtol, storage, ns, has_w, _has_b, view, looped
):
    if looped:
        monkeypatch.setattr(RN, "_BWD_CONFIGS", SMALL_BLOCK)
    x, w, _ = _make(storage, ns, has_w, False, view, dtype, device)
    gy = torch.randn(x.shape, device=device).to(dtype)
    _, rstd = _ref_rms_norm(x, ns, w)
    with _common.count_launches() as launches:
        dx, dw = torch.ops.tile.rms_norm_backward(gy, x, list(ns), rstd, w, [True, True])
    assert launches["rms_norm_bwd"] == 1
    leaves = [t for t in (_f32(x), _f32(w)) if t is not None]
    for t in leaves:
        t.requires_grad_()
    ref = F.rms_norm(leaves[0], list(ns), leaves[1] if has_w else None, EPS)
    ref_grads = torch.autograd.grad(ref, leaves, _f32(gy))
    assert dx.dtype == dtype and dx.shape == x.shape
    _close(dx, ref_grads[0], atol, rtol, scale=8)
    if has_w:
        assert dw.dtype == dtype and dw.shape == w.shape
        _close(dw, ref_grads[1], atol, rtol, scale=8)
    else:
        assert dw.shape == (0,)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("has_w", [True, False])
def test_rms_norm_autograd(poison, device, dtype, atol, rtol, has_w):
    x, w, _ = _make((4, 3, 19), (3, 19), has_w, False, _identity, dtype, device)
    gy = torch.randn(x.shape, device=device).to(dtype)
    leaves = [t.requires_grad_() for t in (x, w) if t is not None]
    with _common.count_launches() as launches:
        out = torch.ops.tile.rms_norm(x, [3, 19], w, EPS)[0]
        grads = torch.autograd.grad(out, leaves, gy)
    assert launches == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}
    ref_leaves = [_f32(t).requires_grad_() for t in leaves]
    ref_out = F.rms_norm(ref_leaves[0], [3, 19], ref_leaves[1] if has_w else None, EPS)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, _f32(gy))
    _close(out, ref_out, atol, rtol, scale=4)
    for got, exp, leaf in zip(grads, ref_grads, leaves, strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        _close(got, exp, atol, rtol, scale=8)


def test_rms_norm_fake_matches_real(device):
    x = torch.randn(2, 5, 6, device=device).to(torch.bfloat16)
    w = torch.randn(5, 6, device=device).to(torch.bfloat16)
    real = torch.ops.tile.rms_norm(x, [5, 6], w, None)
    with FakeTensorMode() as mode:
        fake = torch.ops.tile.rms_norm(mode.from_tensor(x), [5, 6], mode.from_tensor(w), None)
    for r, f in zip(real, fake, strict=True):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


def test_sum_backward_expanded_grad(poison, device):
    """``.sum().backward()`` hands the backward an expanded (all-zero-stride) grad_out."""
    x, w, b = _make((3, 4, 10), (10,), True, True, _identity, torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with _common.count_launches() as launches:
        ln = torch.autograd.grad(torch.ops.tile.layer_norm(x, [10], w, b, EPS)[0].sum(), leaves)
        rms = torch.autograd.grad(torch.ops.tile.rms_norm(x, [10], w, EPS)[0].sum(), leaves[:2])
    assert launches["layer_norm_bwd"] == 1 and launches["rms_norm_bwd"] == 1
    e_ln = torch.autograd.grad(F.layer_norm(x, [10], w, b, EPS).sum(), leaves)
    e_rms = torch.autograd.grad(F.rms_norm(x, [10], w, EPS).sum(), leaves[:2])
    for got, exp in zip(ln + rms, e_ln + e_rms, strict=True):
        _close(got, exp, 1e-5, 1e-5)


# --- custom-op plumbing, checks, faults ----------------------------------------------------


def test_opcheck(device):
    x = torch.randn(3, 2, 7, device=device)
    w, b = torch.randn(7, device=device), torch.randn(7, device=device)
    gy = torch.randn_like(x)
    _, mean, rstd = torch.ops.tile.layer_norm(x, [7], w, b, EPS)
    _, r_rstd = torch.ops.tile.rms_norm(x, [7], w, EPS)
    cases = [
        (torch.ops.tile.layer_norm.default, (x.clone().requires_grad_(), [7], w, b, EPS)),
        (
            torch.ops.tile.layer_norm_backward.default,
            (gy, x, [7], mean, rstd, w, b, [True, True, False]),
        ),
        (torch.ops.tile.rms_norm.default, (x.clone().requires_grad_(), [7], w, None)),
        (torch.ops.tile.rms_norm_backward.default, (gy, x, [7], r_rstd, w, [True, False])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_check_reasons(device):
    x = torch.randn(4, 8, device=device)
    assert LN.check_layer_norm(x, [8], torch.randn(8, device=device), None) is None
    assert RN.check_rms_norm(x, [8], None) is None
    assert "dtype" in LN.check_layer_norm(x.double(), [8])
    assert "dtype" in RN.check_rms_norm(x, [8], torch.randn(8, device=device).half())
    assert "normalized_shape" in LN.check_layer_norm(x, [7])
    assert "shape" in RN.check_rms_norm(x, [8], torch.randn(4, device=device))
    assert LN.check_layer_norm(x, []) is not None
    assert RN.check_rms_norm(torch.randn(4, 0, device=device), [0]) is not None


def test_unsupported_input_falls_back_without_launch(device):
    """A check() failure goes straight to ATen: no launch, no warning."""
    x = torch.randn(3, 8, device=device, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _common.count_launches() as launches:
            out, mean, rstd = torch.ops.tile.layer_norm(x, [8], None, None, EPS)
            r_out, r_rstd = torch.ops.tile.rms_norm(x, [8], None, None)
            dx, _ = torch.ops.tile.rms_norm_backward(
                torch.ones_like(x), x, [8], r_rstd, None, [True, False]
            )
    assert not launches
    e = torch.ops.aten.native_layer_norm(x, [8], None, None, EPS)
    _close(out, e[0], 1e-12, 1e-12)
    _close(r_out, F.rms_norm(x, [8]), 1e-12, 1e-12)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.rms_norm(xr, [8]), xr, torch.ones_like(x))
    _close(dx, g, 1e-10, 1e-10)


@pytest.fixture
def _clean_failures():
    _common.reset_failures()
    yield
    _common.reset_failures()


def _boom(*args, **kwargs):
    raise RuntimeError("simulated launch failure")


def test_fault_layer_norm_falls_back_once(device, monkeypatch, _clean_failures):
    monkeypatch.setattr(LN, "layer_norm_fwd", _boom)
    x, w, b = _make((5, 9), (9,), True, True, _identity, torch.float32, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _common.count_launches() as launches:
            res1 = torch.ops.tile.layer_norm(x, [9], w, b, EPS)
            res2 = torch.ops.tile.layer_norm(x, [9], w, b, EPS)
    runtime = [c for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(runtime) == 1 and "layer_norm_fwd" in str(runtime[0].message)
    assert not launches
    e = torch.ops.aten.native_layer_norm(x, [9], w, b, EPS)
    for res in (res1, res2):
        for got, exp in zip(res, e, strict=True):
            _close(got, exp, 1e-6, 1e-6)


def test_fault_rms_norm_bwd_falls_back_once(device, monkeypatch, _clean_failures):
    monkeypatch.setattr(RN, "rms_norm_bwd", _boom)
    x, w, _ = _make((5, 9), (9,), True, False, _identity, torch.float32, device)
    x.requires_grad_()
    w.requires_grad_()
    gy = torch.randn(5, 9, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = torch.ops.tile.rms_norm(x, [9], w, EPS)[0]
            dx, dw = torch.autograd.grad(out, (x, w), gy)
    runtime = [c for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(runtime) == 1 and "rms_norm_bwd" in str(runtime[0].message)
    rx, rw = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ex, ew = torch.autograd.grad(F.rms_norm(rx, [9], rw, EPS), (rx, rw), gy)
    _close(dx, ex, 1e-5, 1e-5)
    _close(dw, ew, 1e-5, 1e-5)


# --- every config compiles for sm_90 -------------------------------------------------------


def test_sm90_specs_cover_every_config():
    for mod in (LN, RN):
        specs = mod.sm90_specs()
        per_kernel = {}
        for s in specs:
            per_kernel.setdefault(s["fn"], []).append(s)
        # fwd: configs x dtypes x {single, looped}; bwd the same; dw(db): configs x dtypes
        fwd, bwd = len(mod._FWD_CONFIGS), len(mod._BWD_CONFIGS)
        assert sorted(len(v) for v in per_kernel.values()) == sorted([fwd * 6, bwd * 6, bwd * 3])
        for s in specs:
            assert set(s) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
