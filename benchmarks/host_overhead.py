"""Host time per call: each tile op, as a compiled graph calls it, against the ATen ops
it replaces.

A model whose kernels are short is bound by how fast the host issues them: GPT-2 b8 x t512
runs 74 tile kernels per forward in ~2.8 ms of GPU time, so every 10 us of host work per
tile op is a quarter of the budget.  This times back-to-back calls on tiny tensors (the
GPU work is negligible, the queue never fills) and reports microseconds per call for:

- ``aten``: the ATen ops the tile op replaces;
- ``tile_rt``: the runtime twin a compiled graph calls (launch plan replayed);
- ``tile``: the ``tile::`` custom op itself (autograd and redispatch layers included).

On CPU the kernels run in Triton's interpreter, so their launches are stubbed out and
only the host work is timed (say so in the output).

    python benchmarks/host_overhead.py [--device cuda] [--calls 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cases(device: str, dtype):
    import torch

    from tilebackend.codegen import (  # noqa: F401  (registers the tile:: ops)
        fused_matmul,
        fused_norm,
        layer_norm,
        matmul,
        softmax,
    )
    from tilebackend.codegen import pointwise as pw

    aten, tile = torch.ops.aten, torch.ops.tile
    x = torch.randn(64, 64, device=device, dtype=dtype)
    w = torch.randn(64, 128, device=device, dtype=dtype)
    b = torch.randn(128, device=device, dtype=dtype)
    r = torch.randn(64, 64, device=device, dtype=dtype)
    g, beta = (
        torch.ones(64, device=device, dtype=dtype),
        torch.zeros(64, device=device, dtype=dtype),
    )
    gelu = pw.dumps(("gelu", "ACC", "tanh"))
    return [
        (
            "addmm",
            lambda: aten.addmm.default(b, x, w),
            tile.addmm.default,
            (b, x, w),
        ),
        (
            "gelu(addmm)",
            lambda: aten.gelu.default(aten.addmm.default(b, x, w), approximate="tanh"),
            tile.mm_epilogue.default,
            (x, w, b, [], gelu),
        ),
        (
            "layer_norm",
            lambda: aten.native_layer_norm.default(x, [64], g, beta, 1e-5),
            tile.layer_norm.default,
            (x, [64], g, beta, 1e-5),
        ),
        (
            "add + layer_norm",
            lambda: aten.native_layer_norm.default(aten.add.Tensor(x, r), [64], g, beta, 1e-5),
            tile.add_layer_norm.default,
            (x, r, [64], g, beta, 1e-5),
        ),
        (
            "softmax",
            lambda: aten._softmax.default(x, -1, False),
            tile.softmax.default,
            (x, -1, False),
        ),
    ]


def measure(device: str = "cpu", calls: int = 300, reps: int = 5) -> list[dict]:
    """Rows ``{op, aten_us, tile_rt_us, tile_us}``: host microseconds per call."""
    import torch

    from tilebackend import settings
    from tilebackend.codegen import runtime_ops

    stubbed = device == "cpu"
    if stubbed:  # the interpreter would run the kernel: time the host work only
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = lambda self, *a, **k: None

    def per_call(fn) -> float:
        for _ in range(20):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls)
            if device == "cuda":
                torch.cuda.synchronize()
        return best * 1e6

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    # as a compiled graph runs them (a settings scope); configs are not timed (the host
    # work does not depend on them, and tuning would take the time budget)
    scope = settings.Settings.from_env().with_options({"autotune": "off"})
    with settings.use(scope), torch.no_grad():
        for name, aten_fn, op, args in _cases(device, dtype):
            rt = runtime_ops.twin(op)
            rows.append(
                {
                    "op": name,
                    "aten_us": per_call(aten_fn),
                    "tile_rt_us": per_call(lambda rt=rt, args=args: rt(*args)),
                    "tile_us": per_call(lambda op=op, args=args: op(*args)),
                    "device": device,
                    "launches_stubbed": stubbed,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| op | ATen | tile_rt (compiled graphs) | tile:: custom op |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['aten_us']:.1f} us | {r['tile_rt_us']:.1f} us | {r['tile_us']:.1f} us |"
        )
    if rows and rows[0]["launches_stubbed"]:
        lines.append("\n(CPU: Triton interpreter, kernel launches stubbed: host work only)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("host_overhead: on CPU set TRITON_INTERPRET=1 before starting", file=sys.stderr)
        return 2
    rows = measure(device, a.calls)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
