"""A fused SwiGLU Triton kernel, registered as a custom pattern.

``silu(x @ W1) * (x @ W3)`` in a model: the ``silu(a) * b`` part (three ATen ops) becomes
one Triton kernel.  Runs on a GPU, or on CPU in Triton's interpreter (set here).

    python examples/swiglu_triton.py
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import tilebackend  # noqa: E402

#: launches of the kernel below (the test checks it ran)
LAUNCHES = 0


@triton.jit
def _swiglu_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The launcher: any Python callable works as a replacement."""
    global LAUNCHES
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        _swiglu_kernel[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024)
        LAUNCHES += 1
    return out


class MLP(torch.nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w3 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


def main(device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tilebackend.temporary_patterns():  # unregistered again at the end

        @tilebackend.register_pattern(
            replacement=swiglu_triton,
            example_inputs=[("f", (4, 16)), ("f", (4, 16))],
            priority=5,
        )
        def swiglu(a, b):
            return torch.nn.functional.silu(a) * b

        torch.manual_seed(0)
        model = MLP().to(device)
        x = torch.randn(2, 7, 32, device=device)
        before = LAUNCHES
        report = tilebackend.explain(model, x)
        compiled = torch.compile(model, backend="tile")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
        print(report)
        return {"report": report, "launches": LAUNCHES - before}


if __name__ == "__main__":
    main()
