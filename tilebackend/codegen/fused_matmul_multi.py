"""GEMM with a generated pointwise epilogue that writes more than one result:
``outs = [EXPR0, EXPR1, ...](ACC = A @ B + bias, IN0, IN1, ...)``.

In a training graph the backward saves some of the forward epilogue's intermediates (the
GEMM result ``h`` of GPT-2's MLP, ``0.5 * h``, ``tanh(...)``, ``1 + tanh(...)``): the
region is not closed and :mod:`.fused_matmul`'s one-output kernel cannot take it.  The
fusion pass then calls ``tile::mm_epilogue_multi`` with one expression per result: the
first is the region's sink, the others (at most :data:`MAX_EXTRA_OUTPUTS`) the values
also used outside the region (``"ACC"`` for the GEMM result itself).  The kernel is
:mod:`.fused_matmul`'s template (same main loop, extra-input loads and source cache) with
every expression printed in one body (a shared sub-tree is computed once) and one store
per result, each in its expression's dtype (a bool result is stored as uint8).

Shapes are :mod:`.fused_matmul`'s: every result is ``a.shape[:-1] + (N,)``, contiguous.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import triton

from ..exc import KernelError
from . import _common, autotune, pointwise
from . import fused_matmul as _fm
from . import matmul as _mm

__all__ = ["MAX_EXTRA_OUTPUTS", "check", "kernel_for", "matmul_epilogue_multi", "reference"]

KERNEL_NAMES = ("mm_epilogue_multi",)
#: How many results besides the sink one kernel writes.
MAX_EXTRA_OUTPUTS = 4
_OUT_DTYPES = (*_common.SUPPORTED_DTYPES, torch.bool)


def _parse(exprs) -> list[Any]:
    """Expressions from their strings (or nodes; a bare leaf such as ``"ACC"`` too)."""
    return [
        pointwise.loads(e)
        if isinstance(e, str) and not pointwise._is_leaf(e)
        else pointwise.canonical(e)
        for e in exprs
    ]


def _render(exprs: list[Any], bools: tuple[bool, ...], leaf_dtypes=None) -> str:
    """The module source of the kernel for ``exprs`` (first = the sink) with extras."""
    ind = "    "
    in_ptrs, in_strides, loads, leaves, bool_leaves = _fm._render_extras(list(exprs), bools)
    lines, results, constants = pointwise.print_triton_many(
        exprs, {"ACC": "acc", **leaves}, bool_leaves, leaf_dtypes=leaf_dtypes
    )
    for i, const in enumerate(constants):
        if const:  # a constant result: broadcast to the tile
            lines.append(f"_res{i} = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + {results[i]}")
            results[i] = f"_res{i}"
    body = "\n".join(ind + ln for ln in lines) or f"{ind}pass"
    out_ptrs = "".join(
        f"{ind}out{i}_ptr,  # [M, N], the extra result {i}: strides of out_ptr\n"
        for i in range(1, len(exprs))
    )
    stores = "".join(
        f"{ind}out{i}_ptrs = out{i}_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on\n"
        f"{ind}tl.store(out{i}_ptrs, {results[i]}.to(out{i}_ptr.dtype.element_ty), mask=mask)\n"
        for i in range(1, len(exprs))
    )
    return _fm._TEMPLATE.format(
        kname="mm_epilogue_multi",
        out_ptrs=out_ptrs,
        stores=stores,
        expr=[pointwise.dumps(e) for e in exprs],
        bools=list(bools),
        dtypes={k: str(v) for k, v in (leaf_dtypes or {}).items()},
        in_ptrs=in_ptrs,
        in_strides=in_strides,
        loads=loads,
        body=body,
        result=results[0],
    )


def kernel_for(exprs, bools: tuple[bool, ...] = (), leaf_dtypes=None):
    """The ``@triton.jit`` kernel for ``exprs`` (nodes or strings) with these extras."""
    strings = [pointwise.dumps(e) for e in _parse(exprs)]
    return _fm.generated_kernel("mm_epilogue_multi", _render, strings, bools, leaf_dtypes)


def _out_dtypes(es: list[Any], a, extras) -> list[torch.dtype]:
    leaf_dtypes = _fm._leaf_dtypes(a, extras)
    return [pointwise.infer_dtype(e, leaf_dtypes) for e in es]


def check(a: Any, b: Any, bias: Any, extras: Any, exprs: Any) -> str | None:
    """Why ``matmul_epilogue_multi`` cannot run the tile kernel for these inputs, or None."""
    exprs, extras = list(exprs), list(extras)
    if not 2 <= len(exprs) <= MAX_EXTRA_OUTPUTS + 1:
        return f"expects 2 to {MAX_EXTRA_OUTPUTS + 1} expressions, got {len(exprs)}"
    reason = _fm.check(a, b, bias, extras, exprs[0])
    if reason is not None:
        return reason
    for i, expr in enumerate(exprs[1:], 1):
        try:
            e = pointwise.loads(expr) if isinstance(expr, str) else pointwise.canonical(expr)
            leaves = pointwise.input_leaves(e)
            dtype = pointwise.infer_dtype(e, _fm._leaf_dtypes(a, extras))
        except pointwise.ExprError as err:
            return f"expression {i}: {err}"
        for leaf in leaves:
            if leaf == "ACC1" or (leaf != "ACC" and int(leaf[2:]) >= len(extras)):
                return f"expression {i} reads {leaf}, which is not an input"
        if dtype not in _OUT_DTYPES:
            return f"result {i}'s dtype {dtype} is not supported"
    return None


def reference(a, b, bias, extras, exprs) -> list[torch.Tensor]:
    """Eager: ``addmm`` / ``matmul`` in the input dtype, then each expression with eager
    ops (the GEMM and shared sub-trees computed once)."""
    es = _parse(exprs)
    acc = torch.matmul(a, b)
    if bias is not None:
        acc = acc + bias
    leaves = {"ACC": acc, **{f"IN{i}": t for i, t in enumerate(extras)}}
    shape = _fm._out_shape(a, b, extras)
    outs = []
    for e, dtype in zip(es, _out_dtypes(es, a, extras)):
        out = pointwise.evaluate(e, leaves)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            out = torch.as_tensor(out, device=a.device, dtype=dtype).expand(shape)
        outs.append(out.contiguous())
    return outs


def matmul_epilogue_multi(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    extra_inputs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    exprs: list[Any],
) -> list[torch.Tensor]:
    """``[EXPR(a @ b + bias, *extra_inputs) for EXPR in exprs]`` with one generated tile
    kernel.  Each result has ``a.shape[:-1] + (N,)`` and its expression's dtype,
    contiguous.  Raises ``KernelError`` when :func:`check` refuses the inputs."""
    extras = list(extra_inputs)
    reason = check(a, b, bias, extras, exprs)
    if reason:
        raise KernelError(kernel="mm_epilogue_multi", reason=reason)
    es = _parse(exprs)
    out_dtypes = _out_dtypes(es, a, extras)
    K, N = a.shape[-1], b.shape[-1]
    lead = tuple(a.shape[:-1])
    M = math.prod(lead)
    outs = [_common.empty((*lead, N), dt, a.device) for dt in out_dtypes]
    if M == 0 or N == 0:
        return outs
    a2 = a.reshape(M, K)  # a view when the leading dims fold (else one copy)
    # [M, N] views; bool results are written as uint8
    outs2 = [
        o.view(M, N).view(torch.uint8) if o.dtype == torch.bool else o.view(M, N) for o in outs
    ]
    if bias is not None:
        bias2 = bias.expand(M, N)
        bias_strides = bias2.stride()
    else:
        bias2, bias_strides = outs2[0], (0, 0)
    lead = lead or (1,)
    L1 = lead[-1]
    bools, ex_args, ex_strides = _fm._extra_args(extras, lead, N)
    leaf_dtypes = _fm._leaf_dtypes(a, extras)
    has_cast = any(_fm._has_cast(e) for e in es)
    kernel = kernel_for(es, bools, leaf_dtypes if has_cast else None)
    precision = _mm._input_precision(a.dtype)

    def launch(cfg: autotune.Config) -> None:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](
            a2,
            b,
            bias2,
            *outs2,  # the sink, then each extra result
            *ex_args,
            M,
            N,
            K,
            L1,
            *a2.stride(),
            *b.stride(),
            *bias_strides,
            *outs2[0].stride(),
            *ex_strides,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=precision,
            EVEN_K=K % cfg["BLOCK_K"] == 0,
            **cfg.as_kwargs(),
        )

    bucket = autotune.bucket
    text = "\n".join(pointwise.dumps(e) for e in es)
    key = (
        a.dtype,
        tuple(out_dtypes),
        bucket(M),
        bucket(N),
        bucket(K),
        bias is not None,
        precision,
        a2.stride(-1) == 1,
        b.stride(-1) == 1,
        hashlib.sha256(text.encode()).hexdigest()[:12],
        bools,
        tuple(leaf_dtypes.values()) if has_cast else (),
    )
    configs = _mm.prune_configs(_mm.config_space(a.dtype, precision), M, N, K)
    heuristic = _mm.heuristic_config(M, N, K, a.dtype, precision)
    cfg = autotune.select(
        "mm_epilogue_multi", key, configs, heuristic, launch, outputs=lambda: outs, fn=kernel
    )
    launch(cfg)
    return outs


# --- custom op ------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::mm_epilogue_multi",
    mutates_args=(),
    schema="(Tensor a, Tensor b, Tensor? bias, Tensor[] extras, str[] exprs) -> Tensor[]",
)
def mm_epilogue_multi_op(a, b, bias, extras, exprs):
    """``[EXPR(a @ b + bias, *extras) for EXPR in exprs]`` on one generated tile kernel
    (eager when it cannot run)."""
    extras, exprs = list(extras), list(exprs)
    if check(a, b, bias, extras, exprs) is not None:
        return reference(a, b, bias, extras, exprs)
    return _common.guarded(
        "mm_epilogue_multi",
        key=(a.dtype, bias is not None, tuple(t.dtype for t in extras), tuple(exprs)),
        run=lambda: matmul_epilogue_multi(a, b, bias, extras, exprs),
        fallback=lambda: reference(a, b, bias, extras, exprs),
    )


@mm_epilogue_multi_op.register_fake
def _(a, b, bias, extras, exprs):
    extras = list(extras)
    shape = _fm._out_shape(a, b, extras)
    return [a.new_empty(shape, dtype=dt) for dt in _out_dtypes(_parse(exprs), a, extras)]


def _setup(ctx, inputs, output):
    a, b, bias, extras, exprs = inputs
    ctx.exprs = list(exprs)
    ctx.n_extras = len(extras)
    ctx.save_for_backward(a, b, bias, *extras)


def _backward(ctx, grads):
    """Recompute the forward with eager ops under autograd and differentiate it."""
    a, b, bias, *extras = ctx.saved_tensors
    need = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(t.is_floating_point()) if t is not None else None
            for t in (a, b, bias, *extras)
        ]
        outs = reference(leaves[0], leaves[1], leaves[2], leaves[3:], ctx.exprs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        if pairs and wanted:
            got = torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
        else:
            got = [None] * len(wanted)
    it = iter(got)
    g = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
    ga, gb, gbias = (g[i] if need[i] else None for i in range(3))
    gextras = [g[3 + i] if need[3] else None for i in range(ctx.n_extras)]
    return ga, gb, gbias, gextras, None


torch.library.register_autograd("tile::mm_epilogue_multi", _backward, setup_context=_setup)


# --- compile-for-Hopper specs (tests) -------------------------------------------------

#: What the sm_90 specs compile: the GPT-2 training forward's outputs, over
#: :data:`.fused_matmul.SPEC_EXPR` (the sink, with the residual IN0 and bool mask IN1):
#: the GEMM result, ``0.5 * h``, ``tanh(...)`` and a bool result.
_GELU_INNER = ("mul", ("add", "ACC", ("mul", ("pow", "ACC", 3.0), 0.044715)), 0.7978845608028654)
SPEC_EXPRS = (
    _fm.SPEC_EXPR,
    "ACC",
    ("mul", "ACC", 0.5),
    ("tanh", _GELU_INNER),
    ("gt", "ACC", 0.0),
)


def sm90_specs() -> list[dict]:
    """One spec per (dtype, precision, config) of matmul's space for :data:`SPEC_EXPRS`."""
    outs = (("out1_ptr", False), ("out2_ptr", False), ("out3_ptr", False), ("out4_ptr", True))
    return _fm.epilogue_specs("mm_epilogue_multi", kernel_for(SPEC_EXPRS, (False, True)), outs)
