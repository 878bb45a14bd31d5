"""GELU, tanh approximation, written out by hand (as GPT-2 code does), registered as a
custom pattern whose replacement is a single ATen op.

A replacement made of torch ops only is spliced in as those ops (no custom op), so
Inductor still sees and fuses them.

    python examples/gelu_tanh.py
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tilebackend  # noqa: E402


def gelu_written(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_tanh(x):
    return torch.ops.aten.gelu.default(x, approximate="tanh")


def main(device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            gelu_written, replacement=gelu_tanh, example_inputs=[("f", (4, 8))], name="gelu_tanh"
        )
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)).to(device)

        def model(x):
            return mlp[1](gelu_written(mlp[0](x)))

        x = torch.randn(3, 16, device=device)
        with torch.no_grad():
            report = tilebackend.explain(model, x)
            compiled = torch.compile(model, backend="tile")
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
        print(report)
        return {"report": report}


if __name__ == "__main__":
    main()
