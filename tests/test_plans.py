"""Launch plans (``codegen/plans.py``) and the dispatch-light runtime twins
(``codegen/runtime_ops.py``): a tile op's third call with the same metadata replays the
launches recorded on its second, and must give what the full path gives, for new values,
new aliasing and new settings; anything the replay cannot reproduce keeps the full path.
"""

from __future__ import annotations

import pytest
import torch

from tilebackend import settings
from tilebackend.codegen import (  # noqa: F401  (the kernel modules register tile::)
    _common,
    dual_matmul,
    fused_matmul,
    layer_norm,
    matmul,
    plans,
    rms_norm,
    runtime_ops,
)
from tilebackend.codegen import pointwise as pw

GELU_TANH = pw.dumps(("gelu", "ACC", "tanh"))


@pytest.fixture
def scoped():
    """A settings scope of its own (plans are per settings object), poisoning outputs."""
    with settings.use(settings.Settings(poison_outputs=True)) as s:
        yield s


def _served(name: str) -> dict[str, int]:
    return {k: v for (n, k), v in plans.stats.items() if n == name}


def _delta(before: dict[str, int], name: str) -> dict[str, int]:
    now = _served(name)
    return {k: now.get(k, 0) - before.get(k, 0) for k in now if now.get(k, 0) != before.get(k, 0)}


def test_batched_epilogue_replays_over_every_batch(scoped, device):
    """A bmm epilogue (grid axis 1 is the batch, its strides passed by keyword): the
    replay launches the same 2-D grid over new values, with a head-broadcast mask read
    through two batch levels (it used to be copied to the output's size, and such a call
    was not planned: a copy is not a launch)."""
    expr = pw.dumps(("tanh", ("add", ("mul", "ACC", 0.125), "IN0")))
    before = _served("tile::mm_epilogue")
    for _ in range(4):
        q = torch.randn(2, 3, 5, 8, device=device)
        kt = torch.randn(6, 8, 7, device=device)
        m = torch.randn(2, 1, 5, 7, device=device)
        with _common.count_launches() as n:
            out = torch.ops.tile.mm_epilogue(q, kt, None, [m], expr)
        assert dict(n) == {"mm_epilogue": 1}, dict(n)
        ref = torch.tanh((q.reshape(6, 5, 8) @ kt).view(2, 3, 5, 7) * 0.125 + m)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert _delta(before, "tile::mm_epilogue") == {"plain": 1, "recorded": 1, "replayed": 2}


def test_addmm_replays_with_new_values(scoped, device):
    a, b, bias = (torch.randn(*s, device=device) for s in ((7, 13), (13, 9), (9,)))
    before = _served("tile::addmm")
    for i in range(5):
        a, b, bias = a + i, b * 0.5, bias - 1  # new values each call, one metadata
        with _common.count_launches() as n:
            out = torch.ops.tile.addmm(bias, a, b)
        assert dict(n) == {"addmm": 1}, (i, dict(n))  # a replay counts its launch too
        torch.testing.assert_close(out, torch.addmm(bias, a, b), atol=1e-4, rtol=1e-4)
    assert _delta(before, "tile::addmm") == {"plain": 1, "recorded": 1, "replayed": 3}


def test_epilogue_replay_with_bool_extra_and_views(scoped, device):
    """A bool extra is passed to the kernel as a uint8 view, and a broadcast row mask
    through stride-0 strides: the replay must rebuild both from the new inputs."""
    expr = pw.dumps(("where", "IN0", ("gelu", "ACC", "tanh"), 0.0))
    before = _served("tile::mm_epilogue")
    for _ in range(4):
        a = torch.randn(2, 5, 11, device=device)
        w = torch.randn(11, 6, device=device)
        keep = torch.rand(6, device=device) > 0.5
        out = torch.ops.tile.mm_epilogue(a, w, None, [keep], expr)
        ref = torch.where(keep, torch.nn.functional.gelu(a @ w, approximate="tanh"), 0.0)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert _delta(before, "tile::mm_epilogue") == {"plain": 1, "recorded": 1, "replayed": 2}


def test_layer_norm_replay_returns_every_result(scoped, device):
    x = torch.randn(6, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    for _ in range(3):
        x = x * 1.5 + 0.25
        out, mean, rstd = torch.ops.tile.layer_norm(x, [33], w, b, 1e-5)
        ref = torch.ops.aten.native_layer_norm(x, [33], w, b, 1e-5)
        for got, want in zip((out, mean, rstd), ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _served("tile::layer_norm").get("replayed", 0) >= 1


def test_aliasing_is_part_of_the_key(scoped, device):
    """dual GEMM with b0 is b1, then with two different weights of the same metadata:
    a plan recorded for the aliased call must not serve the other."""
    expr = pw.dumps(("mul", ("silu", "ACC"), "ACC1"))
    a = torch.randn(5, 8, device=device)
    w = torch.randn(8, 7, device=device)
    for _ in range(3):
        torch.ops.tile.dual_mm_epilogue(a, w, w, None, None, [], expr)
    w1 = torch.randn(8, 7, device=device)
    for _ in range(3):
        with _common.count_launches() as n:
            out = torch.ops.tile.dual_mm_epilogue(a, w, w1, None, None, [], expr)
        assert dict(n) == {"dual_mm_epilogue": 1}, dict(n)
        torch.testing.assert_close(
            out, torch.nn.functional.silu(a @ w) * (a @ w1), atol=1e-4, rtol=1e-4
        )


def test_host_copy_is_not_replayed(scoped, device):
    """A non-contiguous weight is copied on the host before the launch: that call is not
    replayable, stays on the full path, and stays right."""
    x = torch.randn(4, 16, device=device)
    w = torch.randn(16, 2, device=device)[:, 0]  # stride 2
    before = _served("tile::rms_norm")
    for _ in range(3):
        x = x + 1
        with _common.count_launches() as n:
            out, _ = torch.ops.tile.rms_norm(x, [16], w, 1e-6)
        assert dict(n) == {"rms_norm_fwd": 1}, dict(n)  # the kernel, after a host copy
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert _delta(before, "tile::rms_norm") == {"plain": 1, "unplannable": 1}


def test_failing_replay_falls_back_to_the_full_path(scoped, device, monkeypatch):
    a, b = torch.randn(3, 5, device=device), torch.randn(5, 4, device=device)
    for _ in range(2):
        torch.ops.tile.mm(a, b)
    monkeypatch.setattr(plans.Plan, "run", lambda self, inputs: 1 / 0)
    with _common.count_launches() as n:
        out = torch.ops.tile.mm(a, b)  # the plan raises: the implementation runs
    assert dict(n) == {"mm": 1}, dict(n)
    torch.testing.assert_close(out, a @ b, atol=1e-5, rtol=1e-5)


def test_new_settings_record_a_new_plan(device):
    a, b = torch.randn(3, 6, device=device), torch.randn(6, 5, device=device)
    for poison in (False, True):
        with settings.use(settings.Settings(poison_outputs=poison)):
            before = _served("tile::mm")
            for _ in range(3):
                torch.testing.assert_close(torch.ops.tile.mm(a, b), a @ b, atol=1e-5, rtol=1e-5)
            assert _delta(before, "tile::mm") == {"plain": 1, "recorded": 1, "replayed": 1}


def test_recording_forbids_host_tensor_ops(device):
    rec = plans._Recording()
    x = torch.randn(3, device=device)
    with rec:
        x.view(3, 1).stride()
    assert rec.why is None
    with rec:
        x.fill_(1.0)
    assert rec.why == "the host ran fill_"


def test_runtime_twin_has_the_op_schema_and_impl(device):
    op = torch.ops.tile.mm_epilogue.default
    rt = runtime_ops.twin(op)
    assert rt is runtime_ops.twin(op)  # defined once
    assert str(rt._schema).split("(", 1)[1] == str(op._schema).split("(", 1)[1]
    a, w = torch.randn(4, 8, device=device), torch.randn(8, 3, device=device)
    with _common.count_launches() as n:
        out = rt(a, w, None, [], GELU_TANH)
    assert dict(n) == {"mm_epilogue": 1}
    torch.testing.assert_close(
        out, torch.nn.functional.gelu(a @ w, approximate="tanh"), atol=1e-4, rtol=1e-4
    )
    assert runtime_ops.twin(torch.ops.aten.mm.default) is None


def test_compiled_graph_calls_the_twins(device, monkeypatch):
    """The graph handed to the fallback calls tile_rt:: ops (the report keeps tile::),
    and a training step through them matches eager."""
    from tilebackend.backend import TileBackend
    from tilebackend.fx_passes import runtime

    handed: list[str] = []
    swap = runtime.use_runtime_ops

    def spy(gm):
        n = swap(gm)
        handed.append(gm.code)
        return n

    monkeypatch.setattr(runtime, "use_runtime_ops", spy)

    lin = torch.nn.Linear(16, 24).to(device)
    ln = torch.nn.LayerNorm(24).to(device)

    def f(x):
        return ln(torch.nn.functional.gelu(lin(x), approximate="tanh"))

    backend = TileBackend(options={"fallback": "eager"})
    cf = torch.compile(f, backend=backend)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    for _ in range(3):  # the third call replays
        with _common.count_launches() as n:
            out = cf(x)
        assert dict(n) == {"mm_epilogue_multi": 1, "layer_norm_fwd": 1}, dict(n)
    out.square().sum().backward()
    got = [p.grad.clone() for p in (*lin.parameters(), *ln.parameters())] + [x.grad.clone()]
    for p in (*lin.parameters(), *ln.parameters(), x):
        p.grad = None
    ref = f(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    want = [p.grad for p in (*lin.parameters(), *ln.parameters())] + [x.grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    fwd = [g for g in backend.report.graphs if g.name == "forward"]
    assert fwd and "tile." in fwd[0].code and "tile_rt" not in fwd[0].code
    assert len(handed) == 2  # forward and backward
    for code in handed:
        assert "tile_rt." in code and "torch.ops.tile." not in code, code


def test_tf32_flag_is_part_of_the_key(scoped, device):
    """fp32 GEMMs take their precision from torch's TF32 flag at call time: a plan
    recorded under one value must not serve the other."""
    a, b = torch.randn(4, 8, device=device), torch.randn(8, 5, device=device)
    old = torch.backends.cuda.matmul.allow_tf32
    deltas = []
    try:
        for flag in (False, True, False):
            torch.backends.cuda.matmul.allow_tf32 = flag
            before = _served("tile::mm")
            for _ in range(3):
                torch.testing.assert_close(torch.ops.tile.mm(a, b), a @ b, atol=1e-5, rtol=1e-5)
            deltas.append(_delta(before, "tile::mm"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    fresh = {"plain": 1, "recorded": 1, "replayed": 1}
    assert deltas == [fresh, fresh, {"replayed": 3}], deltas


def test_a_callable_grid_is_not_replayed(device):
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(grid)

    rec = plans._Recording()
    plans._tls.rec = rec
    try:
        plans.on_launch(Kernel(), lambda meta: (1,), (), {})
    finally:
        plans._tls.rec = None
    assert len(calls) == 1 and rec.why == "a callable grid" and not rec.launches
