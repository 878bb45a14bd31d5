"""Broadcast operands of the GEMM kernels are read as vectors, not as tiles.

A linear's bias is one row over N; an epilogue's extra may be one row (``[N]``), one
column (``[M, 1]``) or a tile.  Read as a ``[BLOCK_M, BLOCK_N]`` tile, a broadcast operand
holds a second tile of registers beside the accumulator, and on sm_90 the 128 x 256
tiles spill (see ``test_sm90_compile``).  The host tells the kernel the layout with
constexprs (``BIAS_ROW``, ``IN{i}_MODE``); each test checks the numbers against eager
and the layout the launch was given.
"""

from __future__ import annotations

import pytest
import torch

from tilebackend.codegen import (  # noqa: F401  (registers the tile:: ops)
    _common,
    dual_matmul,
    epilogue_host,
    fused_matmul,
    matmul,
)
from tilebackend.codegen import pointwise as pw

ROW, COL, TILE = epilogue_host.EXTRA_ROW, epilogue_host.EXTRA_COL, epilogue_host.EXTRA_TILE
DTYPES = pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every tile kernel launch, by kernel name."""
    seen: list[tuple[str, dict]] = []
    real = _common.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_common, "launch", spy)
    return seen


def _only(launches, name: str) -> dict:
    got = [kw for k, kw in launches if name in k]
    assert len(got) == 1, [k for k, _ in launches]
    return got[0]


def test_extra_mode():
    assert epilogue_host.extra_mode(0, 0, 1) == ROW
    assert epilogue_host.extra_mode(0, 0, 0) == ROW  # a scalar: one element, read per column
    assert epilogue_host.extra_mode(5, 1, 0) == COL
    assert epilogue_host.extra_mode(0, 1, 0) == COL
    assert epilogue_host.extra_mode(19, 0, 1) == TILE  # [B, 1, N]: one row per batch
    assert epilogue_host.extra_mode(0, 19, 1) == TILE


# lead (3, 5) (M = 15), N = 19: (float extra, bool extra) shapes and their modes
LAYOUTS = [
    ((19,), (19,), ROW, ROW),
    ((3, 5, 1), (5, 1), COL, COL),
    ((3, 5, 19), (1, 5, 19), TILE, TILE),
    ((1, 1, 1), (3, 5, 1), ROW, COL),
    ((3, 1, 19), (3, 1, 1), TILE, COL),
    ((1, 5, 1), (), COL, ROW),
]


def _epilogue(x, w, bias, f, b):
    expr = ("where", "IN1", ("mul", "ACC", "IN0"), ("sub", "ACC", "IN0"))
    out = torch.ops.tile.mm_epilogue(x, w.t(), bias, [f, b], pw.dumps(expr))
    acc = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    return out, torch.where(b, acc * f.double(), acc - f.double())


@pytest.mark.parametrize("fshape, bshape, fmode, bmode", LAYOUTS, ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@DTYPES
def test_epilogue_extra_layouts(
    poison, gen_dir, device, launches, fshape, bshape, fmode, bmode, has_bias, dtype, tol
):
    x = torch.randn(3, 5, 13, device=device).to(dtype)
    w = torch.randn(19, 13, device=device).to(dtype)
    f = torch.randn(fshape, device=device).to(dtype)
    b = torch.rand(bshape, device=device) > 0.5
    bias = torch.randn(19, device=device).to(dtype) if has_bias else None
    out, ref = _epilogue(x, w, bias, f, b)
    kw = _only(launches, "mm_epilogue")
    assert (kw["IN0_MODE"], kw["IN1_MODE"]) == (fmode, bmode)
    assert (kw["HAS_BIAS"], kw["BIAS_ROW"]) == (has_bias, has_bias)
    assert out.shape == ref.shape and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize(
    "bias_shape, row", [((19,), True), ((1, 19), True), ((15, 19), False), ((15, 1), False)]
)
@DTYPES
def test_epilogue_bias_layouts(poison, gen_dir, device, launches, bias_shape, row, dtype, tol):
    x = torch.randn(15, 13, device=device).to(dtype)
    w = torch.randn(19, 13, device=device).to(dtype)
    bias = torch.randn(bias_shape, device=device).to(dtype)
    f = torch.randn(15, 19, device=device).to(dtype)
    b = torch.rand(19, device=device) > 0.5
    out, ref = _epilogue(x, w, bias, f, b)
    kw = _only(launches, "mm_epilogue")
    assert kw["HAS_BIAS"] and kw["BIAS_ROW"] == row
    assert (kw["IN0_MODE"], kw["IN1_MODE"]) == (TILE, ROW)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)


@DTYPES
def test_strided_vectors(poison, gen_dir, device, launches, dtype, tol):
    """Row and column operands that are views with strides (every other element, a
    column of a transposed tensor) are read through those strides."""
    x = torch.randn(15, 13, device=device).to(dtype)
    w = torch.randn(19, 13, device=device).to(dtype)
    bias = torch.randn(38, device=device).to(dtype)[::2]
    f = torch.randn(3, 15, device=device).to(dtype).t()[:, 1:2]  # [15, 1], row stride 1
    b = (torch.rand(19, 2, device=device) > 0.5)[:, 1]  # [19], stride 2
    out, ref = _epilogue(x, w, bias, f, b)
    kw = _only(launches, "mm_epilogue")
    assert (kw["BIAS_ROW"], kw["IN0_MODE"], kw["IN1_MODE"]) == (True, COL, ROW)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)
    launches.clear()
    a = torch.randn(13, 15, device=device).to(dtype).t()  # transposed A
    got = torch.ops.tile.addmm(bias, a, w.t())
    kw = _only(launches, "matmul")
    assert kw["BIAS_ROW"]
    ref = bias.double() + a.double() @ w.double().t()
    torch.testing.assert_close(got.double(), ref, atol=tol * 8, rtol=tol)


@pytest.mark.parametrize("b0, b1", [((19,), (19,)), ((15, 19), (19,)), (None, (15, 1))], ids=str)
@DTYPES
def test_dual_epilogue_bias_layouts(poison, gen_dir, device, launches, b0, b1, dtype, tol):
    x = torch.randn(15, 13, device=device).to(dtype)
    w0, w1 = (torch.randn(19, 13, device=device).to(dtype) for _ in range(2))
    bias0, bias1 = (
        None if s is None else torch.randn(s, device=device).to(dtype) for s in (b0, b1)
    )
    scale = torch.randn(15, 1, device=device).to(dtype)  # one column
    expr = ("mul", ("mul", ("silu", "ACC"), "ACC1"), "IN0")
    out = torch.ops.tile.dual_mm_epilogue(x, w0.t(), w1.t(), bias0, bias1, [scale], pw.dumps(expr))
    kw = _only(launches, "dual_mm_epilogue")
    assert (kw["BIAS0_ROW"], kw["BIAS1_ROW"]) == (b0 == (19,), b1 == (19,))
    assert (kw["HAS_BIAS0"], kw["HAS_BIAS1"]) == (b0 is not None, True)
    assert kw["IN0_MODE"] == COL
    h0 = x.double() @ w0.double().t() + (0 if bias0 is None else bias0.double())
    h1 = x.double() @ w1.double().t() + bias1.double()
    ref = torch.nn.functional.silu(h0) * h1 * scale.double()
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize(
    "op, a_shape, b_shape, bias_shape, row",
    [
        ("addmm", (15, 13), (13, 19), (19,), True),
        ("addmm", (15, 13), (13, 19), (1, 19), True),
        ("addmm", (15, 13), (13, 19), (15, 19), False),
        ("addmm", (15, 13), (13, 19), (15, 1), False),
        ("baddbmm", (3, 5, 13), (3, 13, 19), (3, 1, 19), True),
        ("baddbmm", (3, 5, 13), (3, 13, 19), (3, 5, 19), False),
    ],
    ids=str,
)
@DTYPES
def test_matmul_bias_layouts(
    poison, device, launches, op, a_shape, b_shape, bias_shape, row, dtype, tol
):
    a = torch.randn(a_shape, device=device).to(dtype)
    b = torch.randn(b_shape, device=device).to(dtype)
    bias = torch.randn(bias_shape, device=device).to(dtype)
    out = getattr(torch.ops.tile, op)(bias, a, b, beta=0.5, alpha=2.0)
    kw = _only(launches, "matmul")
    assert kw["HAS_BIAS"] and kw["BIAS_ROW"] == row
    ref = 0.5 * bias.double() + 2.0 * (a.double() @ b.double())
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=tol * 8, rtol=tol)
