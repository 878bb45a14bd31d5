"""The generated GEMM epilogues on two column halves (``EPI_SPLIT``).

A wide tile's epilogue (a 128 x 128 accumulator with a GELU, a residual tile and a mask)
takes fewer registers when it runs on the accumulator's two ``[BLOCK_M, BLOCK_N / 2]``
halves one after the other (sm_90: 158 instead of 255 registers and no spills for the
persistent config); the tuner offers each wide config's split twin, and the heuristic
128 x 128 config is split.  Here the interpreter runs the split configs against eager,
with ragged edges that cut through the second half, every kind of extra, several
results (a bool one and a constant one), dropout's random draws and summed GEMM terms.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gpt2_mlp_operands

from tilebackend.codegen import (  # noqa: F401  (registers the tile:: ops)
    _common,
    autotune,
    epilogue_host,
    fused_matmul,
    fused_matmul_multi,
    fused_matmul_sum,
)
from tilebackend.codegen import pointwise as pw

GELU = ("gelu", "ACC", "tanh")


class _Picker:
    def __init__(self):
        self.tma = False  # pick a persistent TMA config's split twin
        self.split = True  # (False: the same config unsplit)
        self.launched: list[bool] = []  # EPI_SPLIT of each launch
        self.offered: list[list[autotune.Config]] = []  # the configs of each selection


@pytest.fixture
def pick_split(monkeypatch):
    """The tuner picks the widest split config it is offered (a TMA one when
    ``.tma``); records what was offered and each launch's ``EPI_SPLIT``."""
    picker = _Picker()
    real_launch = _common.launch

    def select(name, key, configs, heuristic, run, **_):
        picker.offered.append(list(configs))
        split = [
            c
            for c in configs
            if bool(c.get("EPI_SPLIT")) == picker.split and bool(c.get("TMA")) == picker.tma
        ]
        return max(split, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"]) if split else heuristic

    def spy(kernel, grid, *args, **kwargs):
        picker.launched.append(bool(kwargs.get("EPI_SPLIT")))
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(autotune, "select", select)
    monkeypatch.setattr(_common, "launch", spy)
    return picker


def _operands(dtype, device, m=(3, 43), n=100, k=40):
    a = torch.randn(*m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    return a, w, bias


@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 1e-2)]
)
def test_split_epilogue_with_every_kind_of_extra(poison, pick_split, device, dtype, atol, rtol):
    """129 rows, 100 columns: the last tile's second half is partly outside; a residual
    tile, a row and a column broadcast, and a bool mask, as one expression."""
    a, w, bias = _operands(dtype, device)
    res = torch.randn(3, 43, 100, device=device).to(dtype)
    row = torch.randn(100, device=device).to(dtype)
    col = torch.randn(3, 43, 1, device=device).to(dtype)
    mask = torch.rand(3, 43, 100, device=device) > 0.3
    expr = (
        "where",
        "IN3",
        ("add", ("mul", ("add", GELU, "IN0"), "IN1"), "IN2"),
        0.0,
    )
    extras = [res, row, col, mask]
    out = torch.ops.tile.mm_epilogue(a, w.t(), bias, extras, pw.dumps(expr))
    ref = fused_matmul.reference(a.float(), w.t().float(), bias.float(), extras, expr)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    assert pick_split.launched == [True], pick_split.launched
    assert any(c.get("EPI_SPLIT") for c in pick_split.offered[0])


def test_split_epilogue_with_several_results(poison, pick_split, device):
    """The multi-result template: the sink, the GEMM result, a bool result and a
    constant one (broadcast to the half tile) all written per half."""
    a, w, bias = _operands(torch.float32, device)
    exprs = [("add", GELU, 1.0), "ACC", ("gt", "ACC", 0.0), 2.5]
    outs = torch.ops.tile.mm_epilogue_multi(a, w.t(), bias, [], [pw.dumps(e) for e in exprs])
    refs = fused_matmul_multi.reference(a, w.t(), bias, [], exprs)
    for o, r in zip(outs, refs, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape
        if o.dtype == torch.bool:
            acc = a @ w.t() + bias
            close = acc.abs() < 1e-4  # (a sign may flip on rounding)
            assert torch.equal(o[~close], r[~close])
        else:
            torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    assert pick_split.launched == [True], pick_split.launched


def test_split_epilogue_draws_the_same_random_numbers(poison, pick_split, device):
    """Dropout in the epilogue: each half draws at its elements' flat indices, so the
    split kernel keeps exactly the elements the unsplit one keeps (the Philox stream is
    the kernels' own: eager's reference only has the same distribution)."""
    a, w, bias = _operands(torch.float32, device)
    seed = torch.tensor([1234], device=device)
    expr = pw.dumps(("where", ("gt", ("rand", "IN0"), 0.25), ("mul", "ACC", 1 / 0.75), 0.0))
    out = torch.ops.tile.mm_epilogue(a, w.t(), bias, [seed], expr)
    pick_split.split = False
    whole = torch.ops.tile.mm_epilogue(a, w.t(), bias, [seed], expr)
    assert pick_split.launched == [True, False], pick_split.launched
    assert torch.equal(out, whole)
    kept = (out != 0).float().mean().item()
    assert 0.7 < kept < 0.8, kept
    torch.testing.assert_close(out[out != 0], ((a @ w.t() + bias) / 0.75)[out != 0])


def test_split_epilogue_after_summed_gemms(poison, pick_split, device):
    """``mm_sum_epilogue``: two more GEMMs added into the accumulator, then a split
    epilogue with a residual."""
    a, w, _ = _operands(torch.float32, device)
    tas = [torch.randn(129, 24, device=device), torch.randn(40, 129, device=device).t()]
    tbs = [torch.randn(24, 100, device=device), torch.randn(100, 40, device=device).t()]
    res = torch.randn(3, 43, 100, device=device)
    expr = pw.dumps(("add", "ACC", "IN0"))
    out = torch.ops.tile.mm_sum_epilogue(a, w.t(), None, tas, tbs, [res], expr)
    ref = fused_matmul_sum.reference(a, w.t(), None, tas, tbs, [res], expr)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert pick_split.launched == [True], pick_split.launched


def test_split_epilogue_in_the_persistent_loop(poison, pick_split, device):
    """fp16, a linear's ``W.t()``: the persistent TMA config's split twin (programs walk
    several tiles, each split in two)."""
    if device == "cuda" and not _common.tma_capable(torch.device(device)):
        pytest.skip("no TMA on this GPU")
    pick_split.tma = True
    a, w, bias = _operands(torch.float16, device, m=(2, 70), n=136, k=64)
    res = torch.randn(2, 70, 136, device=device).to(torch.float16)
    expr = ("add", GELU, "IN0")
    out = torch.ops.tile.mm_epilogue(a, w.t(), bias, [res], pw.dumps(expr))
    ref = fused_matmul.reference(a.float(), w.t().float(), bias.float(), [res.float()], expr)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    assert pick_split.launched == [True], pick_split.launched
    assert any(c.get("TMA") and c.get("EPI_SPLIT") for c in pick_split.offered[0])


def test_heuristic_wide_tile_is_split_and_small_ones_are_not(poison, monkeypatch, device):
    """The first guess (a GPU's, here in the interpreter): a 128 x 128 tile runs its
    epilogue split, and its unsplit self stays a candidate; tiles under 128 x 64 have
    no split twin."""
    from tilebackend.codegen import matmul

    seen: list[tuple] = []

    def select(name, key, configs, heuristic, run, **_):
        seen.append((heuristic, list(configs)))
        return heuristic

    monkeypatch.setattr(matmul, "interpret_mode", lambda: False)
    monkeypatch.setattr(autotune, "select", select)
    a, w, bias = _operands(torch.float16, device, m=(129,), n=136, k=64)
    with _common.count_launches() as launches:
        out = torch.ops.tile.mm_epilogue(a, w.t(), bias, [], pw.dumps(GELU))
    ref = fused_matmul.reference(a.float(), w.t().float(), bias.float(), [], GELU)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    assert dict(launches) == {"mm_epilogue": 1}, dict(launches)
    ((first, configs),) = seen
    assert (first["BLOCK_M"], first["BLOCK_N"], first["EPI_SPLIT"]) == (128, 128, True), first
    unsplit = [c for c in configs if not c.get("EPI_SPLIT") and c["BLOCK_N"] == 128]
    assert any(epilogue_host.split_twin(c) == first for c in unsplit), configs
    cfg = autotune.Config.make(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    twin = epilogue_host.split_twin(cfg)
    assert twin is not None and twin["EPI_SPLIT"] and twin["BLOCK_N"] == 128
    assert epilogue_host.split_twin(twin) is None
    small = autotune.Config.make(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
    assert epilogue_host.split_twin(small) is None
    narrow = autotune.Config.make(4, 4, BLOCK_M=256, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)
    assert epilogue_host.split_twin(narrow) is None


@pytest.mark.gpu
def test_split_epilogues_on_the_gpu(device):
    """bf16 on a GPU: GPT-2's MLP shape with a GELU, a residual and a mask, through the
    split twins of the heuristic 128 x 128 tile and (Hopper) of its persistent TMA twin
    (two compiles, to fit the one-shot's test cap); both match eager."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    from tilebackend.codegen import matmul

    m, n, k = 4096, 3072, 768
    a, w, bias, res = gpt2_mlp_operands(device, m, n, k)
    mask = torch.rand(m, n, device=device) > 0.1
    expr = pw.dumps(("where", "IN1", ("add", GELU, "IN0"), 0.0))
    acc = a.float() @ w.float().t() + bias.float()
    ref = torch.where(mask, torch.nn.functional.gelu(acc, approximate="tanh") + res.float(), 0)
    heur = matmul.heuristic_config(m, n, k, torch.bfloat16)
    configs = [epilogue_host.split_twin(heur)]
    if torch.cuda.get_device_capability() >= (9, 0):
        configs.append(epilogue_host.split_twin(matmul.tma_configs(torch.bfloat16)[0]))
    for cfg in configs:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(autotune, "select", lambda *_, cfg=cfg, **__: cfg)
            out = fused_matmul.matmul_epilogue(a, w.t(), bias, [res, mask], expr)
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ref, atol=6e-2, rtol=2e-2, msg=str(cfg))
