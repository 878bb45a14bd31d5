"""A sum of GEMMs with a generated epilogue:
``out = EXPR(ACC = A @ B + bias + T0a @ T0b + T1a @ T1b + ..., IN0, ...)``.

In a backward graph, the gradient of an input that several linears read (attention's
query, key and value projections; a gated MLP's gate and up) is a sum of GEMMs,
``dq @ Wq + dk @ Wk + dv @ Wv``.  The matmul epilogue pass fuses the adds into the last
GEMM with the others' results as extra inputs: each of those is written to memory and
read back.  ``tile::mm_sum_epilogue`` runs every GEMM of the sum, one after another, into
the one accumulator of :mod:`.fused_matmul`'s template (``terms``), then its epilogue:
one launch, no intermediate.  Each term has its own ``K`` and strides; its ``A`` has the
output's rows.  The sum is in fp32 (eager rounds each GEMM to the input dtype first).
"""

from __future__ import annotations

from typing import Any

import torch

from ..exc import KernelError
from . import _common, plans, pointwise
from . import epilogue_host as _host
from . import fused_matmul as _fm
from . import matmul as _mm

__all__ = ["MAX_TERMS", "check", "kernel_for", "matmul_sum_epilogue", "reference", "sm90_specs"]

KERNEL_NAMES = ("mm_sum_epilogue",)
#: the most GEMMs summed besides the first
MAX_TERMS = 3


def kernel_for(expr: Any, n_terms: int, bools: tuple[bool, ...] = (), leaf_dtypes=None):
    """The ``@triton.jit`` kernel for ``expr`` over ``n_terms`` more GEMMs."""
    name = f"mm_sum{n_terms}_epilogue"
    return _fm.generated_kernel(
        name,
        lambda e, bs, dts: _fm.render(name, [e], bs, dts, terms=n_terms),
        # (a JSON string as is; a parsed expression, a bare leaf "ACC" too, dumped)
        expr if isinstance(expr, str) and not pointwise._is_leaf(expr) else pointwise.dumps(expr),
        bools,
        leaf_dtypes,
    )


@_common.memo_reason
def check(
    a: Any, b: Any, bias: Any, term_as: Any, term_bs: Any, extras: Any, expr: Any
) -> str | None:
    """Why ``matmul_sum_epilogue`` cannot run the tile kernel for these inputs, or None."""
    term_as, term_bs = list(term_as), list(term_bs)
    if not 1 <= len(term_as) <= MAX_TERMS or len(term_as) != len(term_bs):
        return (
            f"expects 1 to {MAX_TERMS} GEMM terms (A and B each), got {len(term_as)}/{len(term_bs)}"
        )
    reason = _fm.check(a, b, bias, extras, expr)
    if reason is not None:
        return reason
    rows = a.numel() // a.shape[-1] if a.shape[-1] else None
    for t, (ta, tb) in enumerate(zip(term_as, term_bs)):
        for name, x in ((f"term {t} A", ta), (f"term {t} B", tb)):
            r = _common.device_reason(x) or _common.dtype_reason(x) or _common.dot_reason(x)
            if r:
                return f"{name}: {r}"
            if x.dtype != a.dtype or x.device != a.device:
                return f"{name} is {x.dtype} on {x.device}, a is {a.dtype} on {a.device}"
        if ta.dim() != 2 or tb.dim() != 2 or ta.shape[1] != tb.shape[0]:
            return (
                f"term {t}: expects A [M, K] @ B [K, N], got {tuple(ta.shape)} @ {tuple(tb.shape)}"
            )
        if ta.shape[0] != rows or tb.shape[1] != b.shape[1]:
            return f"term {t}'s product {ta.shape[0]}x{tb.shape[1]} is not the output's {rows}x{b.shape[1]}"
        if ta.shape[1] == 0:
            return f"term {t}: K == 0"
        if max(_mm._max_offset(ta, 2), _mm._max_offset(tb, 2)) > _host.INT32_MAX:
            return f"term {t} is too large for 32-bit indexing"
    return None


def reference(a, b, bias, term_as, term_bs, extras, expr) -> torch.Tensor:
    """Eager: the GEMMs in the input dtype, summed, then the expression."""
    e = pointwise.loads(expr) if isinstance(expr, str) else pointwise.canonical(expr)
    acc = torch.matmul(a, b)
    if bias is not None:
        acc = acc + bias
    for ta, tb in zip(term_as, term_bs):
        acc = acc + (ta @ tb).view(acc.shape)
    shape = _host.out_shape(a, b, extras)
    out = pointwise.evaluate(e, {"ACC": acc, **{f"IN{i}": t for i, t in enumerate(extras)}}, shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        out = torch.as_tensor(out, device=a.device).expand(shape)
    if out is acc or any(out is t for t in extras):  # a custom op must not alias an input
        out = out.clone()
    return out.contiguous()


def matmul_sum_epilogue(a, b, bias, term_as, term_bs, extra_inputs, expr) -> torch.Tensor:
    """``EXPR(a @ b + bias + sum(ta @ tb), *extra_inputs)`` with one generated kernel.
    Raises ``KernelError`` when :func:`check` refuses the inputs."""
    term_as, term_bs, extras = list(term_as), list(term_bs), list(extra_inputs)
    reason = check(a, b, bias, term_as, term_bs, extras, expr)
    if reason:
        raise KernelError(kernel="mm_sum_epilogue", reason=reason)
    e = pointwise.loads(expr) if isinstance(expr, str) else pointwise.canonical(expr)
    n = len(term_as)
    (out,) = _host.launch(
        "mm_sum_epilogue",
        lambda bools, dts: kernel_for(e, n, bools, dts),
        a,
        [b],
        [bias],
        extras,
        [e],
        tma_space=_mm.tma_configs,
        terms=list(zip(term_as, term_bs)),
    )
    return out


@torch.library.custom_op(
    "tile::mm_sum_epilogue",
    mutates_args=(),
    schema=(
        "(Tensor a, Tensor b, Tensor? bias, Tensor[] term_as, Tensor[] term_bs, "
        "Tensor[] extras, str expr) -> Tensor"
    ),
)
@plans.planned("tile::mm_sum_epilogue")
def mm_sum_epilogue_op(a, b, bias, term_as, term_bs, extras, expr):
    """``EXPR(a @ b + bias + sum(ta @ tb), *extras)`` on one generated tile kernel (eager
    when it cannot run)."""
    term_as, term_bs, extras = list(term_as), list(term_bs), list(extras)
    return _common.guarded_op(
        "mm_sum_epilogue",
        check(a, b, bias, term_as, term_bs, extras, expr),
        key=(a.dtype, bias is not None, len(term_as), tuple(t.dtype for t in extras), expr),
        run=lambda: matmul_sum_epilogue(a, b, bias, term_as, term_bs, extras, expr),
        fallback=lambda: reference(a, b, bias, term_as, term_bs, extras, expr),
    )


@mm_sum_epilogue_op.register_fake
def _(a, b, bias, term_as, term_bs, extras, expr):
    extras = list(extras)
    dtype = pointwise.infer_dtype(pointwise.loads(expr), _host.leaf_dtypes(a, extras))
    return a.new_empty(_host.out_shape(a, b, extras), dtype=dtype)


def _setup(ctx, inputs, output):
    a, b, bias, term_as, term_bs, extras, expr = inputs
    ctx.n_terms = len(term_as)
    ctx.args = (expr,)
    ctx.save_for_backward(a, b, bias, *term_as, *term_bs, *extras)


def _backward(ctx, grad):
    """Recompute with eager ops under autograd and differentiate (direct calls only: the
    fused op runs in graphs whose autograd is done)."""
    n = ctx.n_terms
    return tuple(_host.recompute_backward(ctx, [grad], reference, 3, list_lens=(n, n)))


torch.library.register_autograd("tile::mm_sum_epilogue", _backward, setup_context=_setup)


# --- compile-for-Hopper specs (tests) -------------------------------------------------


def sm90_specs() -> list[dict]:
    """The backward's input gradient, ``dq @ Wq + dk @ Wk + dv @ Wv`` (two terms, row-major
    operands), in fp16 and bf16: the heuristic tile, the big ones, the persistent twin,
    and the split epilogue (``EPI_SPLIT``) of each."""
    n_terms = 2
    fn = kernel_for('"ACC"', n_terms)
    unit = ("stride_ak", "stride_bn", "stride_cn", "stride_on", "t0a_sk", "t0b_sn")
    unit += ("t1a_sk", "t1b_sn")
    ints = ["M", "N", "K", "L1", "stride_am", "stride_ak", "stride_bk", "stride_bn"]
    ints += ["stride_cm", "stride_cn", "stride_om", "stride_on"]
    for t in range(n_terms):
        ints += [f"K{t}", f"t{t}a_sm", f"t{t}a_sk", f"t{t}b_sk", f"t{t}b_sn"]
    ints += ["stride_ab", "stride_bb", "B1"]  # (the shared template's bmm arguments: unused)
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        tname = _common.triton_dtype_name(dtype)
        ptrs = ["a_ptr", "b_ptr", "bias_ptr", "out_ptr"]
        ptrs += [f"t{t}{s}_ptr" for t in range(n_terms) for s in ("a", "b")]
        sig = {p: "*" + tname for p in ptrs}
        sig.update({n: "i32" for n in ints if n not in unit})
        space = _mm.config_space(dtype, "tf32")
        configs = [c for c in space if c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128]
        configs += _mm.tma_configs(dtype)[:1]
        configs += [_host.split_twin(c) for c in configs]  # (how a GPU's heuristic starts)
        for cfg in configs:
            specs.append(
                {
                    "name": f"mm_sum_epilogue_{tname}_{_mm.config_label(cfg)}",
                    "fn": fn,
                    "signature": dict(sig),
                    "constexprs": {
                        **{u: 1 for u in unit},
                        "HAS_BIAS": False,
                        "BIAS_ROW": False,
                        "INPUT_PRECISION": "tf32",
                        "EVEN_K": False,
                        **{f"EVEN_K{t}": False for t in range(n_terms)},
                        "TMA": False,
                        "B_NK": False,
                        "EPI_SPLIT": False,
                        "BATCHED": False,
                        **dict(cfg.kwargs),
                    },
                    "divisible": ["M", "N", "K", "stride_am", "stride_bk", "stride_om"]
                    + [f"t{t}{s}" for t in range(n_terms) for s in ("a_sm", "b_sk")],
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                }
            )
    return specs
