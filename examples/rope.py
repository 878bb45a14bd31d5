"""Rotary position embeddings (RoPE), registered as a custom pattern.

The model writes RoPE the Hugging Face way (``x * cos + rotate_half(x) * sin``); the
replacement is any PyTorch callable, here one that rotates pairs with a single
``torch.stack``.  A replacement that is not made of torch ops alone is wrapped in a
``torch.library`` custom op (``tile_user::rope``) whose fake implementation and backward
come from the search function, so the pattern applies in training graphs too.

    python examples/rope.py
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tilebackend  # noqa: E402

#: calls of the replacement (the test checks it ran)
CALLS = 0


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, cos, sin):
    """The search function: what the model computes."""
    return x * cos + rotate_half(x) * sin


def rope_fused(x, cos, sin):
    """The replacement: same numbers, another formulation (a Triton or Helion kernel
    would go here)."""
    global CALLS
    CALLS += 1
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_tables(seq: int, dim: int, device="cpu", dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.outer(torch.arange(seq, device=device).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _examples(dtype):
    cos, sin = rope_tables(5, 8, dtype=dtype)
    return (torch.randn(2, 3, 5, 8, dtype=dtype), cos, sin)


class Attention(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        return (att @ v).transpose(1, 2).reshape(b, t, d)


def main(device: str | None = None) -> dict:
    global CALLS
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            rope, replacement=rope_fused, example_inputs=_examples, name="rope", priority=5
        )
        torch.manual_seed(0)
        model = Attention().to(device)
        x = torch.randn(2, 6, 32, device=device, requires_grad=True)
        cos, sin = rope_tables(6, 8, device=device)
        before = CALLS
        backend = tilebackend.TileBackend()
        compiled = torch.compile(model, backend=backend)
        out = compiled(x, cos, sin)
        out.square().sum().backward()  # training: the backward comes from the search fn
        grad, x.grad = x.grad, None
        ref = model(x, cos, sin)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad, x.grad, atol=1e-4, rtol=1e-4)
        report = backend.report
        print(report)
        return {"report": report, "calls": CALLS - before}


if __name__ == "__main__":
    main()
