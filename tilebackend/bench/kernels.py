"""Kernel benchmarks: the plain and fused shapes of each kernel family (the sizes of
``shared/anchors``), plus size sweeps, for each provider.

Each case is a small function of a few tensors; every provider compiles that same
function.  Rates: TFLOP/s for matmuls (2·M·N·K), GB/s for the memory-bound kernels
(every input read once, every output written once), and % of the ceiling measured in
the same run (``ceiling.mm8192`` for matmuls, ``ceiling.copy`` for the rest).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..codegen._common import count_launches
from . import common


@dataclasses.dataclass
class KernelCase:
    name: str
    family: str
    bound: str  # "compute" (TFLOP/s vs the mm ceiling) or "memory" (GB/s vs copy)
    shape: str
    make: Callable[[str, torch.dtype], tuple[Callable, tuple]]  # -> (fn, args)
    flops: float
    nbytes: float
    sweep: bool = False
    sweep_x: int | None = None  # the swept size, for plots
    #: errors of a random op (``out``, the inputs) -> the error columns, instead of
    #: comparing draws that differ by design
    errors: Callable[[Any, tuple], dict] | None = None


def _randn(*shape, device, dtype, scale=1.0):
    return torch.randn(*shape, device=device, dtype=dtype) * scale


def mm_case(m: int, n: int, k: int, sweep: bool = False) -> KernelCase:
    def make(device, dtype):
        a = _randn(m, k, device=device, dtype=dtype, scale=k**-0.5)
        b = _randn(k, n, device=device, dtype=dtype)

        def mm(a, b):
            return torch.mm(a, b)

        return mm, (a, b)

    name = f"mm{m}" if m == n == k else f"mm_{m}x{n}x{k}"
    return KernelCase(
        name=("sweep." if sweep else "") + name,
        family="mm",
        bound="compute",
        shape=f"{m}x{k} @ {k}x{n}",
        make=make,
        flops=2.0 * m * n * k,
        nbytes=0,
        sweep=sweep,
        sweep_x=m,
    )


def linear_bias_gelu_case(m: int, k: int, n: int) -> KernelCase:
    def make(device, dtype):
        x = _randn(m, k, device=device, dtype=dtype)
        w = _randn(n, k, device=device, dtype=dtype, scale=k**-0.5)
        b = _randn(n, device=device, dtype=dtype)

        def linear_bias_gelu(x, w, b):
            return F.gelu(F.linear(x, w, b), approximate="tanh")

        return linear_bias_gelu, (x, w, b)

    return KernelCase(
        name=f"linear_bias_gelu_{m}x{k}x{n}",
        family="mm",
        bound="compute",
        shape=f"gelu_tanh({m}x{k} @ W[{n}x{k}]^T + b)",
        make=make,
        flops=2.0 * m * n * k,
        nbytes=0,
    )


def qkv_projection_case(m: int, k: int, nq: int, nkv: int, bias: bool) -> KernelCase:
    """Attention's query, key and value linears of one input (``nkv < nq``: GQA)."""

    def make(device, dtype):
        x = _randn(m, k, device=device, dtype=dtype)
        ws = [_randn(n, k, device=device, dtype=dtype, scale=k**-0.5) for n in (nq, nkv, nkv)]
        bs = [_randn(n, device=device, dtype=dtype) if bias else None for n in (nq, nkv, nkv)]

        def qkv_projection(x, wq, wk, wv, bq, bk, bv):
            return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)

        return qkv_projection, (x, *ws, *bs)

    n = nq + 2 * nkv
    return KernelCase(
        name=f"qkv_projection_{m}x{k}x{nq}+{nkv}+{nkv}",
        family="mm",
        bound="compute",
        shape=f"{m}x{k} @ W[{nq}|{nkv}|{nkv}x{k}]^T" + (" + b" if bias else ""),
        make=make,
        flops=2.0 * m * n * k,
        nbytes=0,
    )


def qkv_weight_grads_case(m: int, k: int, nq: int, nkv: int) -> KernelCase:
    """The backward's weight gradients of those linears, as AOTAutograd writes them:
    ``(x^T @ dy_i)^T`` for each projection's output gradient ``dy_i`` (one ``x``)."""

    def make(device, dtype):
        x = _randn(m, k, device=device, dtype=dtype)
        dys = [_randn(m, n, device=device, dtype=dtype, scale=m**-0.5) for n in (nq, nkv, nkv)]

        def qkv_weight_grads(x, dq, dk, dv):
            xt = x.t()
            return (xt @ dq).t(), (xt @ dk).t(), (xt @ dv).t()

        return qkv_weight_grads, (x, *dys)

    n = nq + 2 * nkv
    return KernelCase(
        name=f"qkv_weight_grads_{m}x{k}x{nq}+{nkv}+{nkv}",
        family="mm",
        bound="compute",
        shape=f"x[{m}x{k}]^T @ dy[{m}x({nq}|{nkv}|{nkv})]",
        make=make,
        flops=2.0 * m * n * k,
        nbytes=0,
    )


def softmax_case(m: int, n: int, sweep: bool = False) -> KernelCase:
    def make(device, dtype):
        x = _randn(m, n, device=device, dtype=dtype, scale=2.0)

        def softmax(x):
            return torch.softmax(x, dim=-1)

        return softmax, (x,)

    return KernelCase(
        name=("sweep." if sweep else "") + f"softmax_{m}x{n}",
        family="softmax",
        bound="memory",
        shape=f"{m}x{n}",
        make=make,
        flops=0,
        nbytes=2.0 * m * n,  # x element size applied at run time
        sweep=sweep,
        sweep_x=n,
    )


def scale_mask_softmax_case(b: int, h: int, t: int, s: int) -> KernelCase:
    """Attention scores: ``softmax(scores * scale + mask)`` with an additive causal mask
    of shape (b, 1, t, s), broadcast over the heads (as HF's eager attention does)."""

    def make(device, dtype):
        x = _randn(b, h, t, s, device=device, dtype=dtype, scale=4.0)
        causal = torch.ones(t, s, dtype=torch.bool, device=device).triu(1)
        mask = torch.zeros(b, 1, t, s, device=device, dtype=dtype)
        mask.masked_fill_(causal, torch.finfo(dtype).min)
        scale = 1.0 / math.sqrt(64)

        def scale_mask_softmax(x, mask):
            return torch.softmax(x * scale + mask, dim=-1)

        return scale_mask_softmax, (x, mask)

    return KernelCase(
        name=f"scale_mask_softmax_{b}x{h}x{t}x{s}",
        family="softmax",
        bound="memory",
        shape=f"{b}x{h}x{t}x{s}, mask {b}x1x{t}x{s}",
        make=make,
        flops=0,
        nbytes=2.0 * b * h * t * s + b * t * s,
    )


def alibi_softmax_case(b: int, h: int, t: int, s: int) -> KernelCase:
    """MPT's attention probabilities: ``softmax((scores * scale + alibi).masked_fill(mask,
    finfo.min).float()).to(dtype)``, with an fp32 ALiBi bias of shape (h, 1, s) (it
    promotes the scores to fp32) and a bool causal mask of shape (b, 1, t, s)."""

    def make(device, dtype):
        x = _randn(b, h, t, s, device=device, dtype=dtype, scale=4.0)
        slopes = 2.0 ** -torch.arange(1, h + 1, device=device, dtype=torch.float32)
        alibi = slopes.view(h, 1, 1) * torch.arange(1 - s, 1, device=device).view(1, 1, s)
        causal = torch.ones(t, s, dtype=torch.bool, device=device).triu(1)
        mask = causal.expand(b, 1, t, s).contiguous()
        scale = 1.0 / math.sqrt(64)

        def alibi_softmax(x, alibi, mask):
            z = (x * scale + alibi).masked_fill(mask, torch.finfo(x.dtype).min)
            return torch.softmax(z.float(), dim=-1).to(x.dtype)

        return alibi_softmax, (x, alibi, mask)

    return KernelCase(
        name=f"alibi_softmax_{b}x{h}x{t}x{s}",
        family="softmax",
        bound="memory",
        shape=f"{b}x{h}x{t}x{s}, alibi {h}x1x{s} fp32, bool mask {b}x1x{t}x{s}",
        make=make,
        flops=0,
        nbytes=2.0 * b * h * t * s,  # scores in, probabilities out (the masks: < 5 %)
    )


def attention_dropout_case(b: int, h: int, t: int, s: int, p: float = 0.1) -> KernelCase:
    """HF's eager attention probabilities in training: ``dropout(softmax(scores * scale +
    mask), p)``.  Random draws differ between providers, so the error is taken on the
    elements kept (against the softmax / (1 - p), in fp32), and the share dropped is
    reported (of the entries the mask leaves alive)."""

    def make(device, dtype):
        (fn, args) = scale_mask_softmax_case(b, h, t, s).make(device, dtype)

        def attention_dropout(x, mask):
            return F.dropout(fn(x, mask), p, training=True)

        return attention_dropout, args

    def errors(out, args):
        x, mask = args
        return _dropout_errors(out, torch.softmax(x.float() / math.sqrt(64) + mask.float(), -1), p)

    return KernelCase(
        name=f"attention_dropout_{b}x{h}x{t}x{s}",
        family="softmax",
        bound="memory",
        shape=f"dropout(softmax({b}x{h}x{t}x{s} * c + mask {b}x1x{t}x{s}), {p})",
        make=make,
        flops=0,
        nbytes=2.0 * b * h * t * s + b * t * s,
        errors=errors,
    )


def _dropout_errors(out: torch.Tensor, ref: torch.Tensor, p: float) -> dict:
    """Errors of ``dropout(ref, p)`` whose random draws are the provider's own: on the
    elements kept, against ``ref / (1 - p)`` (fp32); and the share dropped of the
    elements ``ref`` leaves nonzero."""
    live, keep = ref != 0, out != 0
    diff = (out.float() - ref / (1 - p)).abs()[keep]
    scale = ref.abs().max().item() / (1 - p)
    err = diff.max().item() if diff.numel() else 0.0
    dropped = 1.0 - (keep & live).sum().item() / max(live.sum().item(), 1)
    return {"max_abs_err": err, "rel_err": err / scale if scale else err, "dropped": dropped}


def linear_dropout_case(m: int, k: int, n: int, p: float = 0.1) -> KernelCase:
    """GPT-2's residual dropout in training: ``dropout(x @ W^T + b, p)``, drawn in the
    GEMM's epilogue by tile (errors as :func:`attention_dropout_case`'s)."""

    def make(device, dtype):
        x = _randn(m, k, device=device, dtype=dtype)
        w = _randn(n, k, device=device, dtype=dtype, scale=k**-0.5)
        b = _randn(n, device=device, dtype=dtype)

        def linear_dropout(x, w, b):
            return F.dropout(F.linear(x, w, b), p, training=True)

        return linear_dropout, (x, w, b)

    def errors(out, args):
        x, w, b = (t.float() for t in args)
        return _dropout_errors(out, F.linear(x, w, b), p)

    return KernelCase(
        name=f"linear_dropout_{m}x{k}x{n}",
        family="mm",
        bound="compute",
        shape=f"dropout({m}x{k} @ W[{n}x{k}]^T + b, {p})",
        make=make,
        flops=2.0 * m * n * k,
        nbytes=0,
        errors=errors,
    )


def layernorm_case(m: int, n: int, sweep: bool = False) -> KernelCase:
    def make(device, dtype):
        x = _randn(m, n, device=device, dtype=dtype)
        w = 1 + 0.1 * _randn(n, device=device, dtype=dtype)
        b = 0.1 * _randn(n, device=device, dtype=dtype)

        def layernorm(x, w, b):
            return F.layer_norm(x, (n,), w, b, 1e-5)

        return layernorm, (x, w, b)

    return KernelCase(
        name=("sweep." if sweep else "") + f"layernorm_{m}x{n}",
        family="layer_norm",
        bound="memory",
        shape=f"{m}x{n}",
        make=make,
        flops=0,
        nbytes=2.0 * m * n + 2 * n,
        sweep=sweep,
        sweep_x=n,
    )


def rmsnorm_case(m: int, n: int, sweep: bool = False) -> KernelCase:
    def make(device, dtype):
        x = _randn(m, n, device=device, dtype=dtype)
        w = 1 + 0.1 * _randn(n, device=device, dtype=dtype)

        def rmsnorm(x, w):
            return F.rms_norm(x, (n,), w, 1e-6)

        return rmsnorm, (x, w)

    return KernelCase(
        name=("sweep." if sweep else "") + f"rmsnorm_{m}x{n}",
        family="rms_norm",
        bound="memory",
        shape=f"{m}x{n}",
        make=make,
        flops=0,
        nbytes=2.0 * m * n + n,
        sweep=sweep,
        sweep_x=n,
    )


def add_layernorm_case(m: int, n: int) -> KernelCase:
    """``layer_norm(x + residual)`` (the residual add fused in front of the norm)."""

    def make(device, dtype):
        x = _randn(m, n, device=device, dtype=dtype)
        r = _randn(m, n, device=device, dtype=dtype)
        w = 1 + 0.1 * _randn(n, device=device, dtype=dtype)
        b = 0.1 * _randn(n, device=device, dtype=dtype)

        def add_layernorm(x, r, w, b):
            return F.layer_norm(x + r, (n,), w, b, 1e-5)

        return add_layernorm, (x, r, w, b)

    return KernelCase(
        name=f"add_layernorm_{m}x{n}",
        family="layer_norm",
        bound="memory",
        shape=f"{m}x{n} + {m}x{n}",
        make=make,
        flops=0,
        nbytes=3.0 * m * n + 2 * n,
    )


def anchor_cases(profile: str = "anchor") -> list[KernelCase]:
    """The plain and fused shape of each family, at the anchors' sizes (``profile=
    "anchor"``) or tiny ones for CPU runs (``"tiny"``)."""
    if profile == "anchor":
        return [
            mm_case(4096, 4096, 4096),
            linear_bias_gelu_case(8192, 768, 3072),
            linear_dropout_case(8192, 3072, 768),
            qkv_projection_case(4096, 768, 768, 768, bias=True),  # BERT-base, b8 x t512
            qkv_projection_case(4096, 2048, 2048, 256, bias=False),  # the Llama row's GQA
            qkv_weight_grads_case(4096, 2048, 2048, 256),  # and their training backward's
            softmax_case(49152, 1024),
            scale_mask_softmax_case(4, 12, 1024, 1024),
            alibi_softmax_case(4, 12, 1024, 1024),
            attention_dropout_case(4, 12, 1024, 1024),
            layernorm_case(16384, 768),
            layernorm_case(8192, 4096),
            rmsnorm_case(8192, 4096),
            add_layernorm_case(16384, 768),
        ]
    return [
        mm_case(32, 32, 32),
        linear_bias_gelu_case(16, 32, 48),
        linear_dropout_case(16, 48, 32),
        qkv_projection_case(16, 32, 32, 32, bias=True),
        qkv_projection_case(16, 32, 32, 8, bias=False),
        qkv_weight_grads_case(16, 32, 32, 8),
        softmax_case(16, 32),
        scale_mask_softmax_case(2, 2, 8, 8),
        alibi_softmax_case(2, 2, 8, 8),
        attention_dropout_case(2, 2, 8, 8),
        layernorm_case(16, 32),
        layernorm_case(8, 64),
        rmsnorm_case(8, 64),
        add_layernorm_case(16, 32),
    ]


def sweep_cases(profile: str = "anchor") -> list[KernelCase]:
    """Size sweeps: row length for softmax and the norms (2^25 elements in all), square
    size for mm."""
    if profile == "anchor":
        total = 1 << 25
        ns = [256, 512, 1024, 2048, 4096, 8192, 16384]
        mms = [512, 1024, 2048, 4096, 8192]
    else:
        total = 1 << 9
        ns = [16, 32, 64]
        mms = [16, 32]
    cases: list[KernelCase] = []
    for n in ns:
        cases.append(softmax_case(total // n, n, sweep=True))
    for n in ns:
        cases.append(layernorm_case(total // n, n, sweep=True))
    for n in ns:
        cases.append(rmsnorm_case(total // n, n, sweep=True))
    for m in mms:
        cases.append(mm_case(m, m, m, sweep=True))
    return cases


def select(cases: Sequence[KernelCase], names: Sequence[str] | None) -> list[KernelCase]:
    """Cases whose name contains any of ``names`` (all when empty)."""
    if not names:
        return list(cases)
    return [c for c in cases if any(n in c.name for n in names)]


def run_case(
    case: KernelCase,
    providers: Sequence[str],
    *,
    device: str,
    dtype: torch.dtype,
    ceilings: dict[str, float],
    timing: common.Timing,
    budget: common.Budget,
    sink: Callable[[dict], None],
    tile_options: dict | None = None,
) -> None:
    """Time ``case`` under each provider; each row goes to ``sink`` as soon as it is done."""
    fn, args = case.make(device, dtype)
    esize = args[0].element_size()
    nbytes = case.nbytes * esize
    ref = fn(*args)
    base = {
        "suite": "kernel",
        "name": case.name,
        "family": case.family,
        "bound": case.bound,
        "shape": case.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "sweep": case.sweep,
        "sweep_x": case.sweep_x,
    }
    for provider in providers:
        need = 60.0 if provider in common.HEAVY else 5.0
        if provider != "eager" and not budget.allows(need):
            sink(common.skipped_row(base, provider, "time budget"))
            continue
        row = dict(base, provider=provider)
        try:
            compiled, backend = common.compile_provider(provider, fn, tile_options)
            with count_launches() as launches:  # the compile, and one real run
                out, first_s = common.timed_first_call(lambda: compiled(*args), device)
            if provider != "eager":
                row["compile_s"] = first_s
            row.update(case.errors(out, args) if case.errors else common.errors(out, ref))
            del out
            ms = timing.median_ms(lambda: compiled(*args), device)
            row["ms"] = ms
            if case.bound == "compute":
                row["tflops"] = case.flops / ms / 1e9
                ceil = ceilings.get("tflops")
                row["pct_ceiling"] = 100 * row["tflops"] / ceil if ceil else None
            else:
                row["gbps"] = nbytes / ms / 1e6
                ceil = ceilings.get("gbps")
                row["pct_ceiling"] = 100 * row["gbps"] / ceil if ceil else None
            if backend is not None:
                row["tile_launches"] = dict(launches)
                row["tile_ran"] = sum(launches.values()) > 0
                row["replaced"] = backend.report.counts
                row["n_replaced"] = sum(row["replaced"].values())
            row["status"] = "ok"
        except Exception as e:  # a provider failing must not stop the others
            row["status"] = "error"
            row["error"] = common.short_error(e)
        finally:
            if provider != "eager":
                torch._dynamo.reset()
        sink(row)


def run_kernels(
    cases: Sequence[KernelCase],
    providers: Sequence[str],
    *,
    device: str,
    dtype: torch.dtype,
    ceilings: dict[str, float],
    timing: common.Timing,
    budget: common.Budget,
    sink: Callable[[dict], Any],
    tile_options: dict | None = None,
) -> None:
    for case in cases:
        try:
            run_case(
                case,
                providers,
                device=device,
                dtype=dtype,
                ceilings=ceilings,
                timing=timing,
                budget=budget,
                sink=sink,
                tile_options=tile_options,
            )
        except Exception as e:  # building the inputs failed (out of memory, ...)
            for p in providers:
                sink(
                    {
                        "suite": "kernel",
                        "name": case.name,
                        "provider": p,
                        "status": "error",
                        "error": common.short_error(e),
                    }
                )
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
