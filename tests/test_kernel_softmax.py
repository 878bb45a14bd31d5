"""Softmax / log-softmax tile kernels (forward, backward, custom ops) against eager ATen.

Run under the Triton interpreter on CPU (see conftest.py); sizes are kept small.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tilebackend.codegen import _common
from tilebackend.codegen import softmax as sm

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]
LOG = [pytest.param(False, id="softmax"), pytest.param(True, id="log_softmax")]

NEG_INF = float("-inf")


def _fwd_name(log: bool) -> str:
    return "log_softmax_fwd" if log else "softmax_fwd"


def _bwd_name(log: bool) -> str:
    return "log_softmax_bwd" if log else "softmax_bwd"


def _op(log: bool):
    return torch.ops.tile.log_softmax if log else torch.ops.tile.softmax


def _bwd_op(log: bool):
    return torch.ops.tile.log_softmax_backward if log else torch.ops.tile.softmax_backward


def _ref(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Eager reference computed in fp32, rounded to the output dtype."""
    f = torch.log_softmax if log else torch.softmax
    return f(x.float(), dim).to(out_dtype)


def _ref_bwd(g, y, dim, log, out_dtype):
    g, y = g.float(), y.float()
    if log:
        dx = g - torch.exp(y) * g.sum(dim, keepdim=True)
    else:
        dx = y * (g - (g * y).sum(dim, keepdim=True))
    return dx.to(out_dtype)


def _close(got, want, atol, rtol):
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, equal_nan=True)


# --- forward through the custom ops ---------------------------------------------------

# (shape, dim): prime / odd sizes, size 1, 1-D, 4-D, dim 0 and negative dims; few rows
# each, since the interpreter pays per program
FWD_CASES = [
    ((7, 13), -1),
    ((3, 5, 17), -1),
    ((3, 17, 5), 1),
    ((13, 3, 2), -3),
    ((13, 3, 2), 0),
    ((1,), 0),
    ((1, 1), -1),
    ((11,), -1),
    ((2, 1, 5, 3), 2),
]


@pytest.mark.parametrize("log", LOG)
def test_masked_lanes_and_inf_rows_warn_nothing(poison, log):
    """A fully ``-inf`` row and a looped row's masked-off lanes: numpy (which runs the
    interpreter) saw ``-inf - -inf`` and ``log(0)`` there and warned on every launch; a
    user's CPU run got that noise though the result is eager's."""
    x = torch.randn(3, 5000)
    x[0] = NEG_INF
    x[1, 7:] = NEG_INF
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _common.count_launches() as launches:
            y = _op(log)(x, -1, False)
    assert launches[_fwd_name(log)] == 1
    _close(y, _ref(x, -1, log, torch.float32), 1e-5, 1e-5)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape, dim", FWD_CASES, ids=lambda v: str(v))
def test_forward(poison, device, shape, dim, dtype, atol, rtol, log):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    with _common.count_launches() as launches:
        y = _op(log)(x, dim, False)
    assert launches[_fwd_name(log)] == 1
    assert y.is_contiguous()
    _close(y, _ref(x, dim, log, dtype), atol, rtol)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_forward_every_dim_fp32(poison, device, dim, log):
    x = torch.randn(3, 4, 5, device=device)
    with _common.count_launches() as launches:
        y = _op(log)(x, dim, False)
    assert launches[_fwd_name(log)] == 1
    _close(y, _ref(x, dim, log, torch.float32), 1e-5, 1e-5)


def _views(device):
    base = torch.randn(6, 10, device=device)
    base3 = torch.randn(3, 5, 4, device=device)
    base4 = torch.randn(2, 3, 4, 5, device=device)
    base5 = torch.randn(2, 2, 2, 3, 2, device=device)
    return {
        "step_slice": (base[::2, 1::3], -1),
        "step_slice_dim0": (base[::3, ::2], 0),
        "t_lastdim": (base.t(), -1),
        "t_dim0": (base.t(), 0),
        "transpose02": (base3.transpose(0, 2), 1),
        "transpose02_last": (base3.transpose(0, 2), -1),
        "permute4": (base4.permute(2, 0, 3, 1), 2),
        # four non-softmax dims that do not collapse: the documented copy fallback
        "permute5_copy": (base5.permute(3, 1, 4, 0, 2), 0),
        "expanded": (torch.randn(1, 7, device=device).expand(5, 7), -1),
    }


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "view",
    [
        "step_slice",
        "step_slice_dim0",
        "t_lastdim",
        "t_dim0",
        "transpose02",
        "transpose02_last",
        "permute4",
        "permute5_copy",
        "expanded",
    ],
)
def test_forward_non_contiguous(poison, device, view, dtype, atol, rtol, log):
    x, dim = _views(device)[view]
    x = x.to(dtype) if dtype != torch.float32 else x
    with _common.count_launches() as launches:
        y = _op(log)(x, dim, False)
    assert launches[_fwd_name(log)] == 1
    assert y.is_contiguous() and y.shape == x.shape
    _close(y, _ref(x, dim, log, dtype), atol, rtol)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [
        pytest.param(torch.float16, 1e-5, 1e-5, id="fp16"),
        pytest.param(torch.bfloat16, 1e-5, 1e-5, id="bf16"),
    ],
)
def test_forward_half_to_float(poison, device, dtype, atol, rtol, log):
    x = torch.randn(5, 33, device=device).to(dtype)
    with _common.count_launches() as launches:
        y = _op(log)(x, -1, True)
    assert launches[_fwd_name(log)] == 1
    assert y.dtype == torch.float32
    _close(y, _ref(x, -1, log, torch.float32), atol, rtol)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_forward_scalar(poison, device, dtype, atol, rtol, log):
    for value in (2.5, NEG_INF, float("inf")):
        x = torch.tensor(value, device=device, dtype=dtype)
        for dim in (0, -1):
            with _common.count_launches() as launches:
                y = _op(log)(x, dim, False)
            assert launches[_fwd_name(log)] == 1
            want = (torch.log_softmax if log else torch.softmax)(x, dim)
            assert y.shape == () and y.dtype == dtype
            _close(y, want, 0, 0)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("shape, dim", [((0, 5), -1), ((5, 0), -1), ((2, 0, 3), 1), ((2, 0, 3), 2)])
def test_forward_empty(poison, device, shape, dim, log):
    x = torch.randn(shape, device=device)
    y = sm.softmax_fwd(x, dim, log, False)
    assert y.shape == x.shape and y.dtype == x.dtype
    y = _op(log)(x, dim, False)
    assert y.shape == x.shape and y.dtype == x.dtype
    y = sm.softmax_fwd(x.half(), dim, log, True)
    assert y.shape == x.shape and y.dtype == torch.float32


@pytest.mark.parametrize("log", LOG)
def test_forward_inf(poison, device, log):
    x = torch.randn(4, 9, device=device)
    x[0] = NEG_INF  # all -inf: NaN row
    x[1, ::2] = NEG_INF  # partly -inf: zeros there
    x[2, 3] = float("inf")  # +inf: NaN row
    x[3, 4] = float("nan")
    want = (torch.log_softmax if log else torch.softmax)(x, -1)
    _close(_op(log)(x, -1, False), want, 1e-6, 1e-6)
    for block_n in (4, 16):  # looped (4 < 9) and single-block paths
        _close(sm.softmax_fwd(x, -1, log, False, block_n=block_n), want, 1e-6, 1e-6)
        _close(sm.softmax_fwd(x.t(), 0, log, False, block_n=block_n), want.t(), 1e-6, 1e-6)


# --- the looped (long-row) kernels ----------------------------------------------------


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_forward_looped(poison, device, dtype, atol, rtol, log):
    # N=5000 over blocks of 1024: 5 steps, the last one partial
    x = (torch.randn(3, 5000, device=device) * 4).to(dtype)
    x[1, 1000:3000] = NEG_INF  # whole blocks of -inf inside the online max
    y = sm.softmax_fwd(x, -1, log, False, block_n=1024)
    _close(y, _ref(x, -1, log, dtype), atol, rtol)
    # strided along N, half_to_float
    xt = x.t()
    y = sm.softmax_fwd(xt, 0, log, True, block_n=512)
    _close(y, _ref(xt, 0, log, torch.float32), 1e-5, 1e-5)


def test_forward_looped_through_op(poison, device):
    x = torch.randn(2, sm.MAX_SINGLE_BLOCK + 37, device=device)
    with _common.count_launches() as launches:
        y = torch.ops.tile.softmax(x, -1, False)
    assert launches["softmax_fwd"] == 1
    _close(y, _ref(x, -1, False, torch.float32), 1e-6, 1e-5)


# --- backward -------------------------------------------------------------------------

BWD_CASES = [((7, 13), -1), ((3, 17, 5), 1), ((13, 3, 2), -3), ((1,), 0), ((2, 1, 5, 3), 2)]


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape, dim", BWD_CASES, ids=lambda v: str(v))
def test_backward(poison, device, shape, dim, dtype, atol, rtol, log):
    x = torch.randn(shape, device=device).to(dtype)
    y = (torch.log_softmax if log else torch.softmax)(x, dim)
    g = torch.randn(shape, device=device).to(dtype)
    with _common.count_launches() as launches:
        dx = _bwd_op(log)(g, y, dim, dtype)
    assert launches[_bwd_name(log)] == 1
    aten = (
        torch.ops.aten._log_softmax_backward_data if log else torch.ops.aten._softmax_backward_data
    )
    if dtype == torch.float32:
        _close(dx, aten(g, y, dim, dtype), atol, rtol)
    _close(dx, _ref_bwd(g, y, dim, log, dtype), atol, rtol)


@pytest.mark.parametrize("log", LOG)
def test_backward_non_contiguous_and_looped(poison, device, log):
    x = torch.randn(6, 40, device=device)
    y = (torch.log_softmax if log else torch.softmax)(x.t(), 0)  # non-contiguous output
    g = torch.randn(80, 6, device=device)[::2]  # step slice
    want = _ref_bwd(g, y, 0, log, torch.float32)
    with _common.count_launches() as launches:
        dx = _bwd_op(log)(g, y, 0, torch.float32)
    assert launches[_bwd_name(log)] == 1
    _close(dx, want, 1e-5, 1e-5)
    for block_n in (8, 64):  # looped (40 > 8) and single-block
        _close(sm.softmax_bwd(g, y, 0, log, torch.float32, block_n=block_n), want, 1e-5, 1e-5)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_half_to_float(poison, device, dtype, log):
    """Backward of a half_to_float forward: fp32 grad / output, grad_input in fp16 / bf16."""
    x = torch.randn(4, 21, device=device).to(dtype)
    y = (torch.log_softmax if log else torch.softmax)(x.float(), -1)
    g = torch.randn(4, 21, device=device)
    dx = _bwd_op(log)(g, y, -1, dtype)
    meta = torch.ops.aten._softmax_backward_data(g.to("meta"), y.to("meta"), -1, dtype)
    assert dx.dtype == meta.dtype
    _close(dx, _ref_bwd(g, y, -1, log, dx.dtype), 1e-2, 1e-2)


@pytest.mark.parametrize("log", LOG)
def test_backward_scalar_and_empty(poison, device, log):
    g, y = torch.tensor(1.5, device=device), torch.tensor(1.0 if not log else 0.0, device=device)
    dx = _bwd_op(log)(g, y, 0, torch.float32)
    aten = (
        torch.ops.aten._log_softmax_backward_data if log else torch.ops.aten._softmax_backward_data
    )
    _close(dx, aten(g, y, 0, torch.float32), 0, 0)
    for shape in ((0, 4), (4, 0)):
        e = torch.randn(shape, device=device)
        dx = _bwd_op(log)(e, e, -1, torch.float32)
        assert dx.shape == e.shape and dx.dtype == e.dtype


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_backward_looped(poison, device, dtype, atol, rtol, log):
    x = torch.randn(2, 3000, device=device).to(dtype)
    y = (torch.log_softmax if log else torch.softmax)(x, -1)
    g = torch.randn(2, 3000, device=device).to(dtype)
    dx = sm.softmax_bwd(g, y, -1, log, dtype, block_n=1024)
    _close(dx, _ref_bwd(g, y, -1, log, dtype), atol, rtol)


@pytest.mark.parametrize("log", LOG)
@pytest.mark.parametrize("dim", [0, -1])
def test_autograd(poison, device, log, dim):
    x = torch.randn(5, 12, device=device, requires_grad=True)
    w = torch.randn(5, 12, device=device)
    with _common.count_launches() as launches:
        (_op(log)(x, dim, False) * w).sum().backward()
    assert launches[_fwd_name(log)] == 1 and launches[_bwd_name(log)] == 1
    x2 = x.detach().clone().requires_grad_(True)
    ((torch.log_softmax if log else torch.softmax)(x2, dim) * w).sum().backward()
    _close(x.grad, x2.grad, 1e-5, 1e-5)


def test_autograd_sum(poison, device):
    x = torch.randn(4, 7, device=device, requires_grad=True)
    torch.ops.tile.softmax(x, -1, False).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.softmax(x2, -1).sum().backward()
    _close(x.grad, x2.grad, 1e-6, 1e-5)


# --- fake tensors, opcheck, fallbacks ---------------------------------------------------


def test_fake_matches_aten(device):
    with FakeTensorMode():
        x = torch.empty(3, 8, device=device).t()
        h = torch.empty(4, 5, dtype=torch.float16, device=device)
        for log in (False, True):
            y = _op(log)(x, 0, False)
            assert y.shape == (8, 3) and y.stride() == (3, 1)
            assert _op(log)(h, 1, True).dtype == torch.float32
            dx = _bwd_op(log)(h.float(), h.float(), 1, torch.float16)
            want = torch.ops.aten._softmax_backward_data(h.float(), h.float(), 1, torch.float16)
            assert dx.dtype == want.dtype and dx.shape == want.shape


@pytest.mark.parametrize("log", LOG)
def test_opcheck(device, log):
    x = torch.randn(3, 6, device=device)
    torch.library.opcheck(_op(log), (x.t(), 0, False))
    y = (torch.log_softmax if log else torch.softmax)(x, 1)
    torch.library.opcheck(_bwd_op(log), (torch.randn(3, 6, device=device), y, 1, torch.float32))


def test_check_reasons(device):
    assert sm.check(torch.randn(3, 4, device=device), -1) is None
    assert "dtype" in sm.check(torch.ones(3, 4, dtype=torch.int32, device=device), -1)
    assert "out of range" in sm.check(torch.randn(3, 4, device=device), 2)
    assert sm.check(torch.tensor(1.0, device=device), -1) is None
    assert sm.check([1.0], 0) is not None
    g = torch.randn(3, 4, device=device)
    assert sm.check_bwd(g, g, -1, torch.float32) is None
    assert sm.check_bwd(g, g, -1, torch.float16) is None  # backward of half_to_float
    assert "grad_input dtype" in sm.check_bwd(g, g, -1, torch.float64)
    assert "shape" in sm.check_bwd(g, g[:2], -1, torch.float32)


def test_unsupported_dtype_falls_back(device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    with _common.count_launches() as launches:
        y = torch.ops.tile.softmax(x, -1, False)
    assert not launches
    _close(y, torch.softmax(x, -1), 0, 0)


def test_kernel_failure_falls_back(device, monkeypatch):
    _common.reset_failures()

    def boom(*args, **kwargs):
        raise RuntimeError("injected launch failure")

    monkeypatch.setattr(sm, "softmax_fwd", boom)
    x = torch.randn(4, 9, device=device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _common.count_launches() as launches:
                y1 = torch.ops.tile.softmax(x, -1, False)
                y2 = torch.ops.tile.softmax(x, -1, False)  # variant now marked broken
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1 and "softmax_fwd" in str(runtime[0].message)
        assert not launches
        _close(y1, torch.softmax(x, -1), 0, 0)
        _close(y2, torch.softmax(x, -1), 0, 0)
    finally:
        _common.reset_failures()


# --- layout planning ---------------------------------------------------------------------


def test_layout_planning_avoids_copies():
    t = torch.empty(10, 24).t()  # [24, 10], strides (1, 24)
    sizes, strides = sm._groups(tuple(t.shape), 1, [t.stride()])
    assert sizes == [24, 1, 1] and strides == [[1, 0, 0]]
    c = torch.empty(2, 3, 4, 5)
    sizes, _ = sm._groups(tuple(c.shape), 2, [c.stride()])
    assert sizes == [6, 5, 1]  # dims 0 and 1 merge
    p = torch.empty(2, 2, 2, 3, 2).permute(3, 1, 4, 0, 2)  # 4 groups that do not merge
    assert sm._groups(tuple(p.shape), 0, [p.stride()]) is None
    # ... then only the input is copied; the launch still works (see permute5_copy)
    (y, x), g1, g2, _ = sm._plan([torch.empty(p.shape), p], 0)
    assert x.is_contiguous() and not p.is_contiguous()
