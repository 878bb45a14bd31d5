"""The matmul tile kernel (tilebackend.codegen.matmul) and its tile:: custom ops.

On CPU the kernel runs in Triton's interpreter, so sizes stay small.  bf16 runs only on
a GPU: the interpreter's bf16 ``tl.dot`` multiplies bit patterns (Triton issue 11584).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tilebackend.codegen import _common, autotune
from tilebackend.codegen import matmul as mm
from tilebackend.exc import KernelError

DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.float16, 1e-2, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 6e-2, 2e-2, id="bf16", marks=pytest.mark.gpu),
]
SHAPES = [(7, 13, 11), (1, 1, 1), (33, 17, 40), (16, 32, 16)]  # M, N, K (primes, 1, aligned)


def _close(out, ref, atol, rtol):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not out.isnan().any() or ref.isnan().any(), "unwritten (poisoned) elements"
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _addmm_ref(bias, a, b, beta=1.0, alpha=1.0):
    ab = a.double() @ b.double()
    if bias is None or beta == 0:
        return alpha * ab
    return alpha * ab + beta * bias.double()


class _KernelSpy:
    """Stands in for ``_matmul_kernel``: records each launch's arguments, then launches."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.real[grid](*args, **kwargs)

        return launch


@pytest.fixture
def spy(monkeypatch):
    s = _KernelSpy(mm._matmul_kernel)
    monkeypatch.setattr(mm, "_matmul_kernel", s)
    return s


# --- mm / addmm ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_mm(poison, device, dtype, atol, rtol, M, N, K):
    a = _randn(M, K, dtype=dtype, device=device)
    b = _randn(K, N, dtype=dtype, device=device)
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm(a, b)
    assert launches["mm"] == 1
    assert out.dtype == dtype and out.is_contiguous()
    _close(out, a.double() @ b.double(), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("bias_shape", ["N", "MN", "1", "M1", "scalar"])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, -2.0)])
def test_addmm(poison, device, dtype, atol, rtol, bias_shape, alpha, beta):
    M, N, K = 7, 13, 11
    shape = {"N": (N,), "MN": (M, N), "1": (1,), "M1": (M, 1), "scalar": ()}[bias_shape]
    bias = _randn(*shape, dtype=dtype, device=device)
    a = _randn(M, K, dtype=dtype, device=device)
    b = _randn(K, N, dtype=dtype, device=device)
    with _common.count_launches() as launches:
        out = torch.ops.tile.addmm(bias, a, b, beta=beta, alpha=alpha)
    assert launches["addmm"] == 1
    _close(out, _addmm_ref(bias, a, b, beta, alpha), atol, rtol)


def test_addmm_defaults_and_schema(poison, device):
    bias, a, b = _randn(5, device=device), _randn(3, 4, device=device), _randn(4, 5, device=device)
    out = torch.ops.tile.addmm(bias, a, b)
    _close(out, _addmm_ref(bias, a, b), 1e-4, 1e-4)
    schema = str(torch.ops.tile.addmm.default._schema)
    assert schema.startswith("tile::addmm(Tensor self, Tensor mat1, Tensor mat2, float beta=1")


def test_addmm_beta_zero_ignores_nan_bias(poison, device):
    a, b = _randn(6, 5, device=device), _randn(5, 9, device=device)
    bias = torch.full((6, 9), float("nan"), device=device)
    out = torch.ops.tile.addmm(bias, a, b, beta=0.0, alpha=2.0)
    ref = torch.addmm(bias, a, b, beta=0.0, alpha=2.0)
    assert not ref.isnan().any()
    _close(out, ref, 1e-4, 1e-4)


def test_alpha_zero_ignores_nan_inputs(poison, device):
    a = torch.full((4, 3), float("nan"), device=device)
    b, bias = _randn(3, 5, device=device), _randn(5, device=device)
    out = torch.ops.tile.addmm(bias, a, b, beta=3.0, alpha=0.0)
    # BLAS semantics (A and B are not read when alpha == 0), as torch's CPU addmm
    _close(out, 3.0 * bias.expand(4, 5), 1e-6, 1e-6)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_transposed_views_are_read_through_strides(poison, device, spy, dtype, atol, rtol):
    M, N, K = 9, 14, 19
    at = _randn(K, M, dtype=dtype, device=device)  # a = at.t(): m-contiguous
    w = _randn(N, K, dtype=dtype, device=device)  # b = w.t(): k-contiguous, like a weight
    a, b = at.t(), w.t()
    bias = _randn(N, dtype=dtype, device=device)
    out = torch.ops.tile.addmm(bias, a, b)
    _close(out, _addmm_ref(bias, a, b), atol, rtol)
    ((grid, args, kwargs),) = spy.calls
    # the kernel got the caller's storage and strides: no copy was made
    assert args[0].data_ptr() == at.data_ptr() and args[1].data_ptr() == w.data_ptr()
    assert tuple(args[8:10]) == (1, M)  # A strides m, k (args[7] is the batch stride)
    assert tuple(args[11:13]) == (1, K)  # B strides k, n
    assert tuple(args[14:16]) == (0, 1)  # 1-D bias: broadcast over m
    assert kwargs["HAS_BIAS"] is True


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_sliced_noncontiguous_inputs(poison, device, spy, dtype, atol, rtol):
    big_a = _randn(10, 30, dtype=dtype, device=device)
    big_b = _randn(20, 40, dtype=dtype, device=device)
    a = big_a[1:, ::2]  # [9, 15], strides (30, 2)
    b = big_b[3:18, 5:35:3]  # [15, 10], strides (40, 3)
    assert not a.is_contiguous() and not b.is_contiguous()
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm(a, b)
    assert launches["mm"] == 1
    _close(out, a.double() @ b.double(), atol, rtol)
    ((_, args, _),) = spy.calls
    assert args[0].data_ptr() == a.data_ptr() and args[1].data_ptr() == b.data_ptr()
    assert tuple(args[8:10]) == (30, 2) and tuple(args[11:13]) == (40, 3)


def test_empty_and_k_zero(poison, device):
    a, b = _randn(0, 5, device=device), _randn(5, 7, device=device)
    assert torch.ops.tile.mm(a, b).shape == (0, 7)
    assert torch.ops.tile.mm(_randn(4, 5, device=device), _randn(5, 0, device=device)).shape == (
        4,
        0,
    )
    # K == 0: the product is zeros; addmm gives beta * bias
    a0, b0 = _randn(4, 0, device=device), _randn(0, 6, device=device)
    out = torch.ops.tile.mm(a0, b0)
    assert torch.equal(out, torch.zeros(4, 6, device=device))
    bias = _randn(6, device=device)
    out = torch.ops.tile.addmm(bias, a0, b0, beta=0.5)
    _close(out, torch.addmm(bias, a0, b0, beta=0.5), 1e-6, 1e-6)
    out = torch.ops.tile.baddbmm(
        bias, _randn(2, 4, 0, device=device), _randn(2, 0, 6, device=device)
    )
    _close(out, bias.expand(2, 4, 6), 1e-6, 1e-6)
    assert torch.ops.tile.bmm(
        _randn(0, 3, 4, device=device), _randn(0, 4, 5, device=device)
    ).shape == (
        0,
        3,
        5,
    )


# --- bmm / baddbmm ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("M, N, K", [(7, 13, 11), (1, 1, 1)])
def test_bmm(poison, device, dtype, atol, rtol, M, N, K):
    a = _randn(3, M, K, dtype=dtype, device=device)
    b = _randn(3, K, N, dtype=dtype, device=device)
    with _common.count_launches() as launches:
        out = torch.ops.tile.bmm(a, b)
    assert launches["bmm"] == 1
    _close(out, a.double() @ b.double(), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("bias_shape", [(2, 5, 6), (6,), (5, 6), (2, 1, 6), (1,)])
def test_baddbmm(poison, device, dtype, atol, rtol, bias_shape):
    a = _randn(2, 5, 9, dtype=dtype, device=device)
    b = _randn(2, 9, 6, dtype=dtype, device=device)
    bias = _randn(*bias_shape, dtype=dtype, device=device)
    with _common.count_launches() as launches:
        out = torch.ops.tile.baddbmm(bias, a, b, beta=0.75, alpha=-1.5)
    assert launches["baddbmm"] == 1
    ref = -1.5 * (a.double() @ b.double()) + 0.75 * bias.double()
    _close(out, ref, atol, rtol)


def test_baddbmm_transposed_batches_and_nan_bias(poison, device):
    a = _randn(3, 8, 5, device=device).transpose(1, 2)  # [3, 5, 8]
    b = _randn(3, 4, 8, device=device).transpose(1, 2)  # [3, 8, 4]
    bias = torch.full((3, 5, 4), float("nan"), device=device)
    out = torch.ops.tile.baddbmm(bias, a, b, beta=0.0)
    _close(out, a.double() @ b.double(), 1e-4, 1e-4)


def test_batch_is_split_over_grid_launches(poison, device, spy, monkeypatch):
    monkeypatch.setattr(mm, "_MAX_GRID_Y", 2)  # stands for CUDA's 65535 limit
    a, b = _randn(5, 3, 4, device=device), _randn(5, 4, 6, device=device)
    bias = _randn(5, 1, 6, device=device)
    out = mm.matmul(a, b, bias)
    _close(out, _addmm_ref(bias, a, b), 1e-4, 1e-4)
    assert [call[0][1] for call in spy.calls] == [2, 2, 1]


# --- linear + activation ---------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("activation", mm.ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_act(poison, device, dtype, atol, rtol, activation, has_bias):
    x = _randn(2, 5, 11, dtype=dtype, device=device)
    w = _randn(13, 11, dtype=dtype, device=device)
    bias = _randn(13, dtype=dtype, device=device) if has_bias else None
    with _common.count_launches() as launches:
        out = torch.ops.tile.linear_act(x, w, bias, activation)
    assert launches["linear_act"] == 1
    ref = mm.torch_activation(
        F.linear(x.double(), w.double(), None if bias is None else bias.double()), activation
    )
    _close(out, ref, atol, rtol)


def test_linear_act_views_fold_without_copy(poison, device, spy):
    w = _randn(6, 8, device=device)
    bias = _randn(6, device=device)
    # foldable N-d input: one 2-D launch over the input's own storage
    x = _randn(2, 3, 4, 8, device=device)
    out = torch.ops.tile.linear_act(x, w, bias, "gelu")
    _close(out, F.gelu(F.linear(x, w, bias)), 1e-4, 1e-4)
    ((grid, args, _),) = spy.calls
    assert (
        grid[1] == 1 and args[0].data_ptr() == x.data_ptr() and args[1].data_ptr() == w.data_ptr()
    )
    # non-foldable 3-D input (transposed): batched launch, weight shared with stride 0
    xt = _randn(5, 3, 8, device=device).transpose(0, 1)  # [3, 5, 8]
    out = torch.ops.tile.linear_act(xt, w, bias, "silu")
    _close(out, F.silu(F.linear(xt, w, bias)), 1e-4, 1e-4)
    grid, args, _ = spy.calls[1]
    assert grid[1] == 3 and args[0].data_ptr() == xt.data_ptr()
    assert tuple(args[10:13]) == (0, 1, 8)  # B = w.t() broadcast over the batch
    # 1-D input
    v = _randn(8, device=device)
    _close(torch.ops.tile.linear_act(v, w, None, "relu"), F.relu(F.linear(v, w)), 1e-4, 1e-4)


def test_linear_act_unknown_activation_raises(device):
    x, w = _randn(2, 4, device=device), _randn(3, 4, device=device)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.tile.linear_act(x, w, None, "tanh")


# --- autograd ---------------------------------------------------------------------------


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    gout = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    out.backward(gout)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize(
    "name",
    ["mm", "addmm", "bmm", "baddbmm", "linear_none", "linear_relu", "linear_gelu",
     "linear_gelu_tanh", "linear_silu"],
)  # fmt: skip
def test_autograd_matches_eager(poison, device, name):
    M, N, K = 5, 7, 6
    if name == "mm":
        args = (_randn(M, K, device=device), _randn(K, N, device=device))
        tile, eager = torch.ops.tile.mm, torch.mm
    elif name == "addmm":
        args = (_randn(N, device=device), _randn(M, K, device=device), _randn(K, N, device=device))

        def tile(c, a, b):
            return torch.ops.tile.addmm(c, a, b, beta=0.5, alpha=2.0)

        def eager(c, a, b):
            return torch.addmm(c, a, b, beta=0.5, alpha=2.0)
    elif name == "bmm":
        args = (_randn(2, M, K, device=device), _randn(2, K, N, device=device))
        tile, eager = torch.ops.tile.bmm, torch.bmm
    elif name == "baddbmm":
        args = (
            _randn(M, 1, device=device),
            _randn(2, M, K, device=device),
            _randn(2, K, N, device=device),
        )

        def tile(c, a, b):
            return torch.ops.tile.baddbmm(c, a, b, beta=-1.0, alpha=0.5)

        def eager(c, a, b):
            return torch.baddbmm(c, a, b, beta=-1.0, alpha=0.5)
    else:
        act = name.removeprefix("linear_")
        args = (
            _randn(2, M, K, device=device),
            _randn(N, K, device=device),
            _randn(N, device=device),
        )

        def tile(x, w, b):
            return torch.ops.tile.linear_act(x, w, b, act)

        def eager(x, w, b):
            return mm.torch_activation(F.linear(x, w, b), act)

    with _common.count_launches() as launches:
        out, grads = _grads(tile, *args)
    ref_out, ref_grads = _grads(eager, *args)
    assert sum(launches.values()) >= 1 + len(args) - (name in ("addmm", "baddbmm", "linear_none"))
    _close(out, ref_out, 1e-4, 1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        _close(g, r, 1e-4, 1e-4)


def test_fake_impls_match_real(device):
    torch.library.opcheck(
        torch.ops.tile.mm, (_randn(3, 4, device=device), _randn(4, 5, device=device))
    )
    torch.library.opcheck(
        torch.ops.tile.addmm,
        (_randn(5, device=device), _randn(3, 4, device=device), _randn(4, 5, device=device)),
        {"beta": 0.5, "alpha": 2.0},
    )
    torch.library.opcheck(
        torch.ops.tile.baddbmm,
        (
            _randn(1, 5, device=device),
            _randn(2, 3, 4, device=device),
            _randn(2, 4, 5, device=device),
        ),
    )
    torch.library.opcheck(
        torch.ops.tile.linear_act,
        (
            _randn(2, 3, 4, device=device),
            _randn(5, 4, device=device),
            _randn(5, device=device),
            "gelu",
        ),
    )


def test_fake_shapes_under_fake_mode(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 8, dtype=torch.float16, device=device)
        w = torch.empty(6, 8, dtype=torch.float16, device=device)
        out = torch.ops.tile.linear_act(x, w, None, "silu")
        assert out.shape == (4, 3, 6) and out.dtype == torch.float16
        out = torch.ops.tile.bmm(x, w.t().expand(4, 8, 6))
        assert out.shape == (4, 3, 6) and out.stride() == (18, 6, 1)


# --- check / fallback / faults ---------------------------------------------------------------


def test_check_reasons(device):
    a, b = _randn(3, 4, device=device), _randn(4, 5, device=device)
    assert mm.check(a, b) is None
    assert mm.check(a, b, _randn(5, device=device)) is None
    assert "int" in mm.check(a.long(), b.long())
    assert "mixed dtypes" in mm.check(a, b.half())
    assert "bias dtype" in mm.check(a, b, _randn(5, device=device).half())
    assert "rank" in mm.check(_randn(4, device=device), b)
    assert "rank" in mm.check(_randn(1, 2, 3, 4, device=device), b)
    assert "inner sizes" in mm.check(a, _randn(3, 5, device=device))
    assert "broadcast" in mm.check(a, b, _randn(4, device=device))
    assert "batch sizes" in mm.check(_randn(2, 3, 4, device=device), _randn(3, 4, 5, device=device))
    assert "activation" in mm.check(a, b, activation="tanh")
    assert "not a tensor" in mm.check([1.0], b)
    with pytest.raises(KernelError, match="mixed dtypes"):
        mm.matmul(a, b.half())


def test_unsupported_inputs_fall_back_to_aten(poison, device):
    a = _randn(3, 4, dtype=torch.float64, device=device)  # fp64: no tile kernel
    b = _randn(4, 5, dtype=torch.float64, device=device)
    with _common.count_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused input is not a failure: no warning
        out = torch.ops.tile.mm(a, b)
    assert not launches
    assert torch.equal(out, a @ b)


def test_launch_failure_warns_once_and_falls_back(poison, device, monkeypatch, clean_failures):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(mm, "matmul", broken)
    a, b = _randn(3, 4, device=device), _randn(4, 5, device=device)
    before = _common.fallback_counts["mm"]
    with warnings.catch_warnings(record=True) as caught, _common.count_launches() as launches:
        warnings.simplefilter("always")
        out1 = torch.ops.tile.mm(a, b)
        out2 = torch.ops.tile.mm(a, b)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "simulated compile failure" in str(runtime[0].message)
    assert not launches
    assert _common.fallback_counts["mm"] - before == 2
    torch.testing.assert_close(out1, a @ b)
    torch.testing.assert_close(out2, a @ b)


def test_an_artifact_read_failure_skips_one_call_only(poison, device, monkeypatch, clean_failures):
    """A tuning artifact that cannot be read for a moment (deleted while being rewritten)
    is not the kernel's failure: that call runs ATen with a warning, and the next call
    launches the kernel again (it used to stay on ATen for the rest of the process)."""
    from tilebackend.exc import TuningArtifactError

    real = mm.matmul
    fails = [True]

    def flaky(*args, **kwargs):
        if fails.pop() if fails else False:
            raise TuningArtifactError(path="/x/art.json", reason="cannot be read")
        return real(*args, **kwargs)

    monkeypatch.setattr(mm, "matmul", flaky)
    a, b = _randn(3, 4, device=device), _randn(4, 5, device=device)
    with warnings.catch_warnings(record=True) as caught, _common.count_launches() as launches:
        warnings.simplefilter("always")
        out1 = torch.ops.tile.mm(a, b)
        out2 = torch.ops.tile.mm(a, b)
    assert [str(w.message) for w in caught if "art.json" in str(w.message)], caught
    assert launches["mm"] == 1, dict(launches)
    torch.testing.assert_close(out1, a @ b)
    torch.testing.assert_close(out2, a @ b)


# --- configs ------------------------------------------------------------------------------


def test_config_space_and_pruning():
    for dtype, prec in [(torch.float16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")]:
        space = mm.config_space(dtype, prec)
        assert 3 <= len(space) <= 12 and len(set(space)) == len(space)
        for cfg in space:
            assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} <= set(dict(cfg.kwargs))
    space = mm.config_space(torch.float16)
    small = mm.prune_configs(space, 8, 64, 16)
    assert small and all(c["BLOCK_M"] <= 16 and c["BLOCK_K"] <= 128 for c in small)
    assert mm.prune_configs(space, 4096, 4096, 4096) == space
    assert all(c["BLOCK_K"] <= 64 for c in mm.prune_configs(space, 512, 512, 64))
    # the interpreter's heuristic uses small blocks
    cfg = mm.heuristic_config(7, 13, 11, torch.float32, "ieee")
    assert max(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) <= 32
    assert autotune.bucket(13) == 16


def test_input_precision_follows_torch(monkeypatch):
    monkeypatch.setattr(mm, "interpret_mode", lambda: False)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert mm._input_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert mm._input_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_input_precision_when_both_tf32_apis_were_used(monkeypatch):
    """A program that set TF32 through the legacy flag and through ``fp32_precision``
    makes torch's ``allow_tf32`` raise; the GEMMs read the newer setting instead."""
    monkeypatch.setattr(mm, "interpret_mode", lambda: False)
    matmul = torch.backends.cuda.matmul
    old_flag, old_precision = matmul.allow_tf32, matmul.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch warns about the legacy flag)
            matmul.allow_tf32 = True
            matmul.fp32_precision = "ieee"
            with pytest.raises(RuntimeError):
                matmul.allow_tf32  # noqa: B018  (the property raises for mixed APIs)
            assert mm._input_precision(torch.float32) == "ieee"
            matmul.fp32_precision = "tf32"
            assert mm._input_precision(torch.float32) == "tf32"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.fp32_precision = old_precision
            matmul.allow_tf32 = old_flag  # (last: the legacy flag reads again)


def test_sm90_specs_cover_every_dtype():
    specs = mm.sm90_specs()
    names = {s["name"] for s in specs}
    assert len(names) == len(specs)
    for dtype in ("fp16", "bf16", "fp32_tf32", "fp32_ieee"):
        assert any(f"matmul_{dtype}" in n for n in names)
