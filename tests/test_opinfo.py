"""PyTorch's own edge-case samples (OpInfo) for every op family we cover, compiled through
the backend: results must match eager, and covered cases must run a tile kernel."""

from __future__ import annotations

import pytest
import torch

import tilebackend
from tilebackend.codegen import _common

opinfo = pytest.importorskip("torch.testing._internal.common_methods_invocations")

# op name -> tile kernels of which at least one must run for a covered sample
COVERED = {
    "softmax": ("softmax_fwd",),
    "log_softmax": ("log_softmax_fwd",),
    "nn.functional.softmin": ("softmax_fwd",),
    "_softmax_backward_data": ("softmax_bwd",),
    "nn.functional.layer_norm": ("layer_norm_fwd",),
    "native_layer_norm": ("layer_norm_fwd",),
    "nn.functional.rms_norm": ("rms_norm_fwd",),
    "mm": ("mm",),
    "addmm": ("addmm", "mm"),
    "bmm": ("bmm",),
    "baddbmm": ("baddbmm", "bmm"),
    "nn.functional.linear": ("addmm", "mm", "bmm"),
    "matmul": ("mm", "bmm", "addmm"),
}
TOL = {torch.float32: (1e-5, 1.3e-6), torch.float16: (2e-3, 2e-3)}


def _ops():
    for op in opinfo.op_db:
        if op.name in COVERED:
            yield pytest.param(op, id=f"{op.name}.{op.variant_test_name or 'default'}")


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    return 0


def _expects_kernel(op, sample, dtype, out) -> bool:
    """Would a user expect a tile kernel here?  Float32/16 work with non-empty output."""
    if op.variant_test_name == "with_dtype":
        return False  # computes in float64, which our kernels don't take
    if _numel(out) == 0:
        return False
    if op.name == "matmul":
        a, b = sample.input, sample.args[0]
        return a.dim() >= 2 and b.dim() >= 2  # 1-D operands are dot / mv
    if op.name == "nn.functional.linear" and sample.input.dim() < 2:
        return False  # a 1-D input is a matrix-vector product
    if op.name in ("nn.functional.layer_norm", "nn.functional.rms_norm", "native_layer_norm"):
        return True
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("op", list(_ops()))
def test_opinfo_samples(op, dtype):
    if dtype not in op.supported_dtypes("cpu"):
        pytest.skip("dtype not supported by the op on CPU")
    atol, rtol = TOL[dtype]
    missed = []
    for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=False)):
        args = (sample.input, *sample.args)
        kwargs = dict(sample.kwargs)

        def fn(*a):
            return op.op(*a, **kwargs)

        try:
            ref = fn(*args)
        except Exception:
            continue  # eager rejects it too (error-input samples)
        torch._dynamo.reset()
        backend = tilebackend.TileBackend(options={"fallback": "eager"})
        with _common.count_launches() as launches:
            out = torch.compile(fn, backend=backend)(*args)
        torch.testing.assert_close(
            out, ref, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"sample {i}: {m}"
        )
        if _expects_kernel(op, sample, dtype, ref) and not any(
            launches[k] for k in COVERED[op.name]
        ):
            missed.append(
                (
                    i,
                    [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)],
                    kwargs,
                    str(backend.report),
                )
            )
    assert not missed, "covered samples that ran no tile kernel:\n" + "\n".join(map(str, missed))


GRAD_OPS = ("softmax", "log_softmax", "nn.functional.layer_norm", "nn.functional.rms_norm",
            "mm", "addmm", "bmm", "baddbmm", "nn.functional.linear")  # fmt: skip


@pytest.mark.parametrize("op", [p for p in _ops() if p.values[0].name in GRAD_OPS])
def test_opinfo_samples_backward(op):
    """Gradients through the compiled op equal eager's for every sample (fp32)."""
    dtype = torch.float32
    for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        kwargs = dict(sample.kwargs)
        leaves = [a for a in (sample.input, *sample.args) if isinstance(a, torch.Tensor)]
        if not any(t.requires_grad for t in leaves):
            continue

        def fn(*a):
            return op.op(*a, **kwargs)

        def grads(f):
            for t in leaves:
                t.grad = None
            out = f(sample.input, *sample.args)
            out.sum().backward() if out.numel() else None
            return out, [None if t.grad is None else t.grad.clone() for t in leaves]

        try:
            ref_out, ref = grads(fn)
        except Exception:
            continue
        torch._dynamo.reset()
        with _common.count_launches() as launches:
            _, got = grads(
                torch.compile(fn, backend=tilebackend.TileBackend(options={"fallback": "eager"}))
            )
        if _expects_kernel(op, sample, dtype, ref_out):
            assert sum(launches.values()) > 0, f"sample {i}: no tile kernel ran"
        for g, r in zip(got, ref):
            if r is None:
                continue
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m: f"sample {i}: {m}")
