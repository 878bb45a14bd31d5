"""The persistent TMA main loop of the generated GEMM-epilogue templates.

On Hopper, ``tile::mm_epilogue`` and ``tile::mm_epilogue_multi`` also offer the tuner
persistent configs (``TMA=True``): one program per SM walks the output tiles, loading A
and B through TMA descriptors (no masks: the edges read as zero).  They are offered only
for fp16/bf16 operands that TMA can read (row-major up to a linear's ``W.t()``, 16-byte
aligned rows); the interpreter runs them here with :data:`_common.INTERPRET_PROGRAMS`
programs, so each program walks several tiles.  bf16 ``tl.dot`` is wrong in the
interpreter (Triton issue 11584): fp16 only; the ``gpu`` test runs bf16.
"""

from __future__ import annotations

import pytest
import torch
from helpers import gpt2_mlp_operands

from tilebackend.codegen import (  # noqa: F401  (registers the tile:: ops)
    _common,
    autotune,
    dual_matmul,
    epilogue_host,
    fused_matmul,
    fused_matmul_multi,
    matmul,
    plans,
)
from tilebackend.codegen import pointwise as pw

GELU_RES = pw.dumps(
    (
        "add",
        ("mul", ("mul", "ACC", 0.5), ("add", ("erf", ("mul", "ACC", 0.7071067811865476)), 1.0)),
        "IN0",
    )
)


@pytest.fixture
def launches(monkeypatch):
    """``(kernel name, grid, keyword arguments)`` of every tile kernel launch."""
    seen: list[tuple[str, tuple, dict]] = []
    real = _common.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((getattr(kernel, "__name__", str(kernel)), grid, dict(kwargs)))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_common, "launch", spy)
    return seen


@pytest.fixture
def pick_tma(monkeypatch):
    """The tuner picks the first TMA config it is offered (else the heuristic one);
    ``offered`` lists the configs of each selection."""
    offered: list[list[autotune.Config]] = []

    def select(name, key, configs, heuristic, run, **_):
        offered.append(list(configs))
        return next((c for c in configs if c.get("TMA")), heuristic)

    monkeypatch.setattr(autotune, "select", select)
    return offered


def _weights(n, k, dtype, device):
    return torch.randn(n, k, device=device).to(dtype)


def test_tma_layout(device):
    """Which operands a TMA config may read, and how."""
    if device != "cpu":
        pytest.skip("the interpreter's answers (a GPU's depend on its capability)")
    half = torch.float16
    a = torch.randn(40, 24).to(half)
    w = torch.randn(32, 24).to(half)
    assert epilogue_host.tma_layout(a, w.t()) == "nk"  # a linear's weight
    assert epilogue_host.tma_layout(a, w.t().contiguous()) == "kn"
    assert epilogue_host.tma_layout(a.t().contiguous().t(), w.t()) is None  # A column-major
    assert epilogue_host.tma_layout(a.float(), w.t().float()) is None  # 4-byte dtypes: no
    assert epilogue_host.tma_layout(a.bfloat16(), w.t().bfloat16()) == "nk"
    odd = torch.randn(40, 13).to(half)  # 26-byte rows
    assert epilogue_host.tma_layout(odd, torch.randn(32, 13).to(half).t()) is None
    shifted = torch.randn(40 * 24 + 1).to(half)[1:].view(40, 24)  # 2 bytes off alignment
    assert shifted.data_ptr() % 16
    assert epilogue_host.tma_layout(shifted, w.t()) is None
    assert (
        epilogue_host.tma_layout(a, torch.randn(32 * 24 + 1).to(half)[1:].view(32, 24).t()) is None
    )


# (M, N, K, B's layout): ragged in each dim (3 x 3 tiles of 128 for 3 programs, a K
# tail of 8); a row-major B needs 16-byte rows (N % 8 == 0 in fp16), W.t() needs K % 8
SHAPES = [
    (300, 264, 72, "nk"),
    (300, 264, 72, "kn"),
    (129, 67, 40, "nk"),
    (129, 72, 40, "kn"),
    (64, 640, 136, "nk"),
]


@pytest.mark.parametrize("m, n, k, layout", SHAPES, ids=str)
def test_persistent_tma_epilogue(poison, gen_dir, device, launches, pick_tma, m, n, k, layout):
    dtype = torch.float16
    a = torch.randn(m, k, device=device).to(dtype)
    w = _weights(n, k, dtype, device)
    b = w.t() if layout == "nk" else w.t().contiguous()
    bias = torch.randn(n, device=device).to(dtype)
    res = torch.randn(m, n, device=device).to(dtype)
    out = torch.ops.tile.mm_epilogue(a, b, bias, [res], GELU_RES)
    (name, grid, kw), *rest = launches
    assert not rest and "mm_epilogue" in name
    assert kw["TMA"] is True and kw["B_NK"] == (layout == "nk")
    tiles = -(-m // kw["BLOCK_M"]) * -(-n // kw["BLOCK_N"])
    assert grid == (min(tiles, _common.persistent_programs(a.device)),)
    acc = a.double() @ b.double() + bias.double()
    ref = torch.nn.functional.gelu(acc) + res.double()
    assert not out.isnan().any()  # every tile of every program's walk was written
    torch.testing.assert_close(out.double(), ref, atol=4e-2, rtol=1e-2)


def test_persistent_tma_multi_output(poison, gen_dir, device, launches, pick_tma):
    """The several-result template (a training forward keeps the GEMM result)."""
    m, n, k = 200, 136, 48
    a = torch.randn(m, k, device=device).half()
    w = _weights(n, k, torch.float16, device)
    exprs = [pw.dumps(("relu", "ACC")), "ACC"]
    out, acc = torch.ops.tile.mm_epilogue_multi(a, w.t(), None, [], exprs)
    (name, _, kw), *rest = launches
    assert not rest and "mm_epilogue_multi" in name and kw["TMA"] is True
    ref = a.double() @ w.double().t()
    torch.testing.assert_close(acc.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.double(), ref.relu(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_persistent_tma_dual_epilogue(poison, gen_dir, device, launches, pick_tma, layout):
    """SwiGLU's dual GEMM: both weights through TMA, two accumulators a tile."""
    m, n, k = 200, 136, 72
    a = torch.randn(m, k, device=device).half()
    w0, w1 = _weights(n, k, torch.float16, device), _weights(n, k, torch.float16, device)
    b0, b1 = (w0.t(), w1.t()) if layout == "nk" else (w0.t().contiguous(), w1.t().contiguous())
    bias1 = torch.randn(n, device=device).half()
    expr = pw.dumps(("mul", ("silu", "ACC"), "ACC1"))
    out = torch.ops.tile.dual_mm_epilogue(a, b0, b1, None, bias1, [], expr)
    (name, grid, kw), *rest = launches
    assert not rest and "dual_mm_epilogue" in name
    assert kw["TMA"] is True and kw["B_NK"] == (layout == "nk") and grid == (3,)
    g, u = a.double() @ b0.double(), a.double() @ b1.double() + bias1.double()
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(g) * u, atol=5e-2, rtol=1e-2)
    # the two weights read different ways: no TMA config is offered
    launches.clear()
    out = torch.ops.tile.dual_mm_epilogue(a, w0.t(), w1.t().contiguous(), None, bias1, [], expr)
    assert not any(c.get("TMA") for c in pick_tma[-1])
    assert [kw["TMA"] for _, _, kw in launches] == [False]
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(g) * u, atol=5e-2, rtol=1e-2)


def test_no_tma_where_it_cannot(device, launches, pick_tma):
    """Small problems, 4-byte dtypes, misaligned rows: no TMA config is offered, and the
    launch runs the non-persistent loop."""
    cases = [
        (torch.randn(40, 24), torch.randn(32, 24)),  # M, N < 64
        (torch.randn(96, 24), torch.randn(80, 24)),  # fp32
        (torch.randn(96, 13), torch.randn(80, 13)),  # 26-byte rows in fp16
    ]
    for i, (a, w) in enumerate(cases):
        if i != 1:
            a, w = a.half(), w.half()
        a, w = a.to(device), w.to(device)
        launches.clear()
        out = torch.ops.tile.mm_epilogue(a, w.t(), None, [], pw.dumps(("relu", "ACC")))
        assert not any(c.get("TMA") for c in pick_tma[-1])
        (_, _, kw), *rest = launches
        assert not rest and kw["TMA"] is False
        ref = (a.double() @ w.double().t()).relu()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)


def test_replayed_plan_keeps_to_aligned_inputs(poison, device, launches, pick_tma):
    """A recorded TMA launch is replayed for inputs of the same metadata; an input of
    that shape and stride that is not 16-byte aligned is a different plan, which does
    not use TMA (a misaligned TMA base is a device fault)."""
    m, n, k = 130, 72, 32
    w = _weights(n, k, torch.float16, device)
    expr = pw.dumps(("relu", "ACC"))
    replayed = ("tile::mm_epilogue", "replayed")
    before = plans.stats[replayed]
    for _ in range(3):  # plain, recorded, replayed
        a = torch.randn(m, k, device=device).half()
        out = torch.ops.tile.mm_epilogue(a, w.t(), None, [], expr)
        ref = (a.double() @ w.double().t()).relu()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
    assert plans.stats[replayed] == before + 1
    assert [kw["TMA"] for _, _, kw in launches] == [True, True]  # (a replay skips launch())
    launches.clear()
    for _ in range(3):
        a = torch.randn(m * k + 1, device=device).half()[1:].view(m, k)
        out = torch.ops.tile.mm_epilogue(a, w.t(), None, [], expr)
        ref = (a.double() @ w.double().t()).relu()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
    assert plans.stats[replayed] == before + 2
    assert [kw["TMA"] for _, _, kw in launches] == [False, False]


def test_quick_search_tries_the_tma_twin(monkeypatch):
    """On a GPU the quick search times the heuristic config's TMA twin (the nearest
    neighbour: only ``TMA`` differs) among its few candidates."""
    monkeypatch.setattr(matmul, "interpret_mode", lambda: False)
    m = n = k = 4096
    configs, heuristic = matmul.tuning_choices(
        matmul.config_space, matmul.heuristic_config, torch.bfloat16, "tf32", m, n, k
    )
    configs += matmul.prune_configs(matmul.tma_configs(torch.bfloat16), m, n, k)
    near = autotune.neighbours(heuristic, configs, autotune.QUICK_MAX_CANDIDATES - 1)
    twin = autotune.Config(
        tuple(sorted({**dict(heuristic.kwargs), "TMA": True}.items())),
        heuristic.num_warps,
        heuristic.num_stages,
    )
    assert twin in matmul.tma_configs(torch.bfloat16)
    assert near[0] == twin


@pytest.mark.gpu
def test_tma_configs_on_the_gpu(device):
    """bf16 on a Hopper GPU: the heuristic's persistent TMA twin (the one the quick
    search times; one compile, to fit the one-shot's test cap) runs the GELU + residual
    epilogue of GPT-2's MLP shape and matches eager."""
    if device != "cuda" or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper GPU")
    a, w, bias, res = gpt2_mlp_operands(device)
    ref = torch.nn.functional.gelu(a.float() @ w.float().t() + bias.float()) + res.float()
    for cfg in matmul.tma_configs(torch.bfloat16)[:1]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(autotune, "select", lambda *_, cfg=cfg, **__: cfg)
            out = fused_matmul.matmul_epilogue(a, w.t(), bias, [res], GELU_RES)
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ref, atol=6e-2, rtol=2e-2, msg=str(cfg))


@pytest.mark.gpu
def test_tma_dual_configs_on_the_gpu(device):
    """bf16 on a Hopper GPU: the dual template's first TMA config (the heuristic's twin)
    runs Llama's SwiGLU and matches eager."""
    if device != "cuda" or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper GPU")
    m, n, k = 2048, 5632, 2048
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w0, w1 = (torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(2))
    expr = pw.dumps(("mul", ("silu", "ACC"), "ACC1"))
    ref = torch.nn.functional.silu(a.float() @ w0.float().t()) * (a.float() @ w1.float().t())
    for cfg in dual_matmul.tma_configs(torch.bfloat16)[:1]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(autotune, "select", lambda *_, cfg=cfg, **__: cfg)
            out = dual_matmul.dual_matmul_epilogue(a, w0.t(), w1.t(), None, None, [], expr)
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ref, atol=6e-2, rtol=2e-2, msg=str(cfg))
