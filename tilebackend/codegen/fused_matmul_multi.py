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

from typing import Any

import torch

from ..exc import KernelError
from . import _common, plans, pointwise
from . import epilogue_host as _host
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
    return _fm.render("mm_epilogue_multi", list(exprs), bools, leaf_dtypes)


def kernel_for(exprs, bools: tuple[bool, ...] = (), leaf_dtypes=None):
    """The ``@triton.jit`` kernel for ``exprs`` (nodes or strings) with these extras."""
    strings = [pointwise.dumps(e) for e in _parse(exprs)]
    return _fm.generated_kernel("mm_epilogue_multi", _render, strings, bools, leaf_dtypes)


def _out_dtypes(es: list[Any], a, extras) -> list[torch.dtype]:
    leaf_dtypes = _host.leaf_dtypes(a, extras)
    return [pointwise.infer_dtype(e, leaf_dtypes) for e in es]


@_common.memo_reason
def check(a: Any, b: Any, bias: Any, extras: Any, exprs: Any) -> str | None:
    """Why ``matmul_epilogue_multi`` cannot run the tile kernel for these inputs, or None."""
    exprs, extras = list(exprs), list(extras)
    if not 2 <= len(exprs) <= MAX_EXTRA_OUTPUTS + 1:
        return f"expects 2 to {MAX_EXTRA_OUTPUTS + 1} expressions, got {len(exprs)}"
    try:
        es = _parse(exprs)
        dtypes = _out_dtypes(es, a, extras)
    except pointwise.ExprError as err:
        return f"expression: {err}"
    reason = _host.check_operands(a, {"b": b}, {"bias": bias}, extras, es, batched=True)
    if reason is not None:
        return reason
    for i, dtype in enumerate(dtypes[1:], 1):
        if dtype not in _OUT_DTYPES:
            return f"result {i}'s dtype {dtype} is not supported"
    return None


def reference(a, b, bias, extras, exprs) -> list[torch.Tensor]:
    """Eager: ``addmm`` / ``matmul`` in the input dtype, then each expression with eager
    ops (the GEMM and shared sub-trees computed once)."""
    es = _parse(exprs)
    acc = _host.eager_gemm(a, b)
    if bias is not None:
        acc = acc + bias
    leaves = {"ACC": acc, **{f"IN{i}": t for i, t in enumerate(extras)}}
    shape = _host.out_shape(a, b, extras)
    outs = []
    for e, dtype in zip(es, _out_dtypes(es, a, extras)):
        out = pointwise.evaluate(e, leaves, shape)
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
    return _host.launch(
        "mm_epilogue_multi",
        lambda bools, dts: kernel_for(es, bools, dts),
        a,
        [b],
        [bias],
        extras,
        es,
        tma_space=_mm.tma_configs,
    )


# --- custom op ------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::mm_epilogue_multi",
    mutates_args=(),
    schema="(Tensor a, Tensor b, Tensor? bias, Tensor[] extras, str[] exprs) -> Tensor[]",
)
@plans.planned("tile::mm_epilogue_multi")
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
    shape = _host.out_shape(a, b, extras)
    return [a.new_empty(shape, dtype=dt) for dt in _out_dtypes(_parse(exprs), a, extras)]


def _setup(ctx, inputs, output):
    a, b, bias, extras, exprs = inputs
    ctx.args = (list(exprs),)
    ctx.save_for_backward(a, b, bias, *extras)


def _backward(ctx, grads):
    """Recompute the forward with eager ops under autograd and differentiate it."""
    return tuple(_host.recompute_backward(ctx, grads, reference, 3))


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
