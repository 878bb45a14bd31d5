"""ATen pointwise ops as :mod:`.pointwise` expression nodes: the fusion pass's front end.

:func:`from_aten` turns one ATen (or prims) call whose tensor operands are already
expressions into a node; activations with no node of their own (``clamp hardtanh
leaky_relu elu softplus hardswish hardsigmoid mish``, and the ``*_backward`` ops of these
and of ``gelu tanh sigmoid silu``, ReLU's ``threshold_backward``) are written out with
ATen's formulas.  For a NaN saved input the backwards follow ATen's scalar / CUDA
formulas (ATen's CPU vector path differs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .pointwise import BINARY, ExprError, canonical

__all__ = ["ATEN_KINDS", "from_aten", "is_pointwise"]


def _aten_kinds() -> dict[Any, str]:
    aten, prims = torch.ops.aten, torch.ops.prims
    table = {
        "add.Tensor": "add",
        "add.Scalar": "add",
        "sub.Tensor": "sub",
        "sub.Scalar": "sub",
        "rsub.Scalar": "rsub",
        "rsub.Tensor": "rsub",
        "mul.Tensor": "mul",
        "mul.Scalar": "mul",
        "div.Tensor": "div",
        "div.Scalar": "div",
        "pow.Tensor_Scalar": "pow",
        "pow.Tensor_Tensor": "pow",
        "pow.Scalar": "pow",
        "maximum.default": "maximum",
        "minimum.default": "minimum",
        "clamp_min.default": "maximum",
        "clamp_max.default": "minimum",
        "lt.Tensor": "lt",
        "lt.Scalar": "lt",
        "le.Tensor": "le",
        "le.Scalar": "le",
        "gt.Tensor": "gt",
        "gt.Scalar": "gt",
        "ge.Tensor": "ge",
        "ge.Scalar": "ge",
        "eq.Tensor": "eq",
        "eq.Scalar": "eq",
        "ne.Tensor": "ne",
        "ne.Scalar": "ne",
        "neg.default": "neg",
        "exp.default": "exp",
        "log.default": "log",
        "tanh.default": "tanh",
        "sigmoid.default": "sigmoid",
        "relu.default": "relu",
        "silu.default": "silu",
        "erf.default": "erf",
        "rsqrt.default": "rsqrt",
        "sqrt.default": "sqrt",
        "abs.default": "abs",
        "reciprocal.default": "reciprocal",
        "logical_not.default": "logical_not",
        "logical_and.default": "logical_and",
        "logical_or.default": "logical_or",
        "log1p.default": "log1p",
        "expm1.default": "expm1",
        "sin.default": "sin",
        "cos.default": "cos",
        "sign.default": "sign",
        "gelu.default": "gelu",
        # activations, written out in the nodes above (see from_aten)
        "clamp.default": "clamp",
        "clamp.Tensor": "clamp",
        "hardtanh.default": "hardtanh",
        "leaky_relu.default": "leaky_relu",
        "elu.default": "elu",
        "softplus.default": "softplus",
        "hardswish.default": "hardswish",
        "hardsigmoid.default": "hardsigmoid",
        "mish.default": "mish",
        "where.self": "where",
        "where.ScalarSelf": "where",
        "where.ScalarOther": "where",
        "where.Scalar": "where",
        "masked_fill.Scalar": "masked_fill",
        "_to_copy.default": "to",
        "clone.default": "clone",  # (eval-mode dropout's, in a graph without decompositions)
        # backward-only ops, written out in the nodes above (see from_aten)
        "tanh_backward.default": "tanh_backward",
        "sigmoid_backward.default": "sigmoid_backward",
        "gelu_backward.default": "gelu_backward",
        "silu_backward.default": "silu_backward",
        "threshold_backward.default": "threshold_backward",
        "native_dropout_backward.default": "native_dropout_backward",
        "hardtanh_backward.default": "hardtanh_backward",
        "leaky_relu_backward.default": "leaky_relu_backward",
        "elu_backward.default": "elu_backward",
        "hardswish_backward.default": "hardswish_backward",
        "hardsigmoid_backward.default": "hardsigmoid_backward",
        "softplus_backward.default": "softplus_backward",
        "mish_backward.default": "mish_backward",
    }
    out: dict[Any, str] = {}
    for name, kind in table.items():
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            out[op] = kind
    conv = getattr(getattr(prims, "convert_element_type", None), "default", None)
    if conv is not None:
        out[conv] = "to"
    return out


#: ATen (and prims) OpOverloads that :func:`from_aten` turns into nodes, with their kind.
ATEN_KINDS: dict[Any, str] = _aten_kinds()

_TO_COPY_OK = {"dtype", "layout", "device", "pin_memory", "memory_format", "non_blocking"}


#: ``tile::dropout_keep(x, seed, p)``: ``rand(seed) > p`` over ``x``'s elements (the
#: fusion pass's form of a dropout's keep mask, :mod:`.dropout`)
_DROPOUT_KEEP = "tile.dropout_keep.default"


def _kind(target: Any) -> str | None:
    kind = ATEN_KINDS.get(target)
    if kind is None and str(target) == _DROPOUT_KEEP:
        return "dropout_keep"
    return kind


def is_pointwise(target: Any) -> bool:
    """True when ``target`` (an ATen OpOverload) has a node kind (see :func:`from_aten`)."""
    return _kind(target) is not None


def from_aten(target: Any, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> Any:
    """The node for ``target(*args, **kwargs)`` whose tensor operands are already nodes.

    Tensor arguments must be given as expressions (leaves or nodes); scalars as Python
    numbers.  Handles ``alpha`` (add / sub / rsub), ``approximate`` (gelu), the dtype of
    ``_to_copy`` / ``convert_element_type`` (a ``torch.dtype``), ``clone`` (the identity),
    ``masked_fill``, and the
    scalar arguments of the activations written out in nodes (``clamp`` / ``hardtanh`` as
    ``maximum`` / ``minimum``, ``leaky_relu elu softplus hardswish hardsigmoid mish`` and
    their ``*_backward`` ops, ATen's formulas).  Raises
    :class:`ExprError` for an unsupported target or argument (e.g. ``div`` with a
    rounding mode, ``_to_copy`` to another device, a dtype with no node).
    """
    kwargs = dict(kwargs or {})
    kind = _kind(target)
    if kind is None:
        raise ExprError(f"{target} is not a supported pointwise op")
    a = list(args)
    if kind in ("add", "sub", "rsub"):
        alpha = kwargs.pop("alpha", a[2] if len(a) > 2 else 1)
        _no_kwargs(target, kwargs)
        x, y = a[0], a[1]
        if alpha != 1:
            y = ("mul", y, float(alpha))
        if kind == "rsub":
            x, y = (y, x) if alpha == 1 else (a[1], ("mul", a[0], float(alpha)))
            return canonical(("sub", x, y))
        return canonical((kind, x, y))
    if kind == "gelu":
        approx = kwargs.pop("approximate", a[1] if len(a) > 1 else "none")
        _no_kwargs(target, kwargs)
        return canonical(("gelu", a[0], approx))
    if kind == "to":
        dtype = kwargs.pop("dtype", a[1] if len(a) > 1 else None)
        for k in list(kwargs):
            if k not in _TO_COPY_OK:
                raise ExprError(f"{target}: argument {k!r} is not supported")
        if kwargs.get("device") is not None:
            raise ExprError(f"{target}: a device change is not pointwise")
        if dtype is None:
            return canonical(a[0])
        return canonical(("to", a[0], dtype))
    if kind == "clone":
        memory_format = kwargs.pop("memory_format", None)
        _no_kwargs(target, kwargs)
        if memory_format not in (None, torch.preserve_format, torch.contiguous_format):
            raise ExprError(f"{target}: memory_format {memory_format} is a layout change")
        return canonical(a[0])
    if kind == "masked_fill":
        _no_kwargs(target, kwargs)
        return canonical(("where", a[1], a[2], a[0]))
    if kind == "gelu_backward":
        approx = kwargs.pop("approximate", a[2] if len(a) > 2 else "none")
        _no_kwargs(target, kwargs)
        return canonical(("mul", a[0], _gelu_derivative(a[1], approx)))
    if kind == "tanh_backward":  # grad * (1 - y^2), y = tanh(x)
        _no_kwargs(target, kwargs)
        return canonical(("mul", a[0], ("sub", 1.0, ("mul", a[1], a[1]))))
    if kind == "sigmoid_backward":  # grad * (1 - y) * y, y = sigmoid(x)
        _no_kwargs(target, kwargs)
        return canonical(("mul", ("mul", a[0], ("sub", 1.0, a[1])), a[1]))
    if kind == "silu_backward":  # grad * s * (1 + x * (1 - s)), s = sigmoid(x)
        _no_kwargs(target, kwargs)
        s = ("sigmoid", a[1])
        return canonical(("mul", a[0], ("mul", s, ("add", ("mul", a[1], ("sub", 1.0, s)), 1.0))))
    if kind == "native_dropout_backward":  # grad * keep * scale
        _no_kwargs(target, kwargs)
        return canonical(("mul", ("mul", a[0], a[1]), float(a[2])))
    if kind == "dropout_keep":  # (x, seed, p): x only gives the shape
        _no_kwargs(target, kwargs)
        return canonical(("gt", ("rand", a[1]), float(a[2])))
    if kind == "threshold_backward":  # ReLU's: 0 where x <= threshold, else grad
        _no_kwargs(target, kwargs)
        return canonical(("where", ("le", a[1], float(a[2])), 0.0, a[0]))
    if kind in _ACTIVATIONS:
        names, build = _ACTIVATIONS[kind]
        vals = []
        for i, (name, default) in enumerate(names):
            v = kwargs.pop(name, a[i] if i < len(a) else default)
            if v is _REQUIRED:
                raise ExprError(f"{target}: argument {name!r} is missing")
            vals.append(v)
        _no_kwargs(target, kwargs)
        return canonical(build(*vals))
    _no_kwargs(target, kwargs)
    if kind == "where":
        return canonical(("where", a[0], a[1], a[2]))
    if kind in BINARY:
        return canonical((kind, a[0], a[1]))
    return canonical((kind, a[0]))


_REQUIRED = object()


def _scalar(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ExprError(f"{what} must be a Python number, got {v!r}")
    return float(v)


def _scale(x: Any, c: float) -> Any:
    """``x * c``, no node for ``c == 1`` (exact)."""
    return x if c == 1.0 else ("mul", x, c)


def _clamp(x: Any, lo: Any, hi: Any) -> Any:
    """``clamp``: ``min(max(x, lo), hi)``, NaN in ``x`` or a bound propagates (like
    eager); a None bound is left out."""
    if lo is None and hi is None:
        raise ExprError("clamp: at least one of min / max must be given")
    if lo is not None:
        x = ("maximum", x, lo if isinstance(lo, (str, tuple)) else _scalar(lo, "clamp min"))
    if hi is not None:
        x = ("minimum", x, hi if isinstance(hi, (str, tuple)) else _scalar(hi, "clamp max"))
    return x


def _hardtanh(x, lo, hi):
    return _clamp(x, _scalar(lo, "min_val"), _scalar(hi, "max_val"))


def _leaky_relu(x, slope):  # x > 0 ? x : x * slope
    return ("where", ("gt", x, 0.0), x, ("mul", x, _scalar(slope, "negative_slope")))


def _elu(x, alpha, scale, input_scale):
    # ATen: x <= 0 ? expm1(x * input_scale) * alpha * scale : x * scale
    alpha, scale, ins = (_scalar(v, "elu scalar") for v in (alpha, scale, input_scale))
    neg = _scale(("expm1", _scale(x, ins)), alpha * scale)
    return ("where", ("le", x, 0.0), neg, _scale(x, scale))


def _softplus(x, beta, threshold):
    # ATen: x * beta > threshold ? x : log1p(exp(x * beta)) / beta
    beta, threshold = _scalar(beta, "beta"), _scalar(threshold, "threshold")
    xb = _scale(x, beta)
    sp = ("log1p", ("exp", xb))
    return ("where", ("gt", xb, threshold), x, sp if beta == 1.0 else ("div", sp, beta))


def _hardsigmoid(x):  # min(max(x + 3, 0), 6) / 6
    return ("div", ("minimum", ("maximum", ("add", x, 3.0), 0.0), 6.0), 6.0)


def _hardswish(x):  # x * min(max(x + 3, 0), 6) / 6
    return ("div", ("mul", x, ("minimum", ("maximum", ("add", x, 3.0), 0.0), 6.0)), 6.0)


def _mish(x):  # x * tanh(log1p(exp(x))): no softplus threshold, as ATen
    return ("mul", x, ("tanh", ("log1p", ("exp", x))))


def _hardtanh_backward(g, x, lo, hi):  # x <= lo || x >= hi ? 0 : g (NaN x: g)
    lo, hi = _scalar(lo, "min_val"), _scalar(hi, "max_val")
    return ("where", ("le", x, lo), 0.0, ("where", ("ge", x, hi), 0.0, g))


def _leaky_relu_backward(g, x, slope, self_is_result):  # x > 0 ? g : g * slope
    slope = _scalar(slope, "negative_slope")
    if self_is_result and slope < 0:
        raise ExprError("leaky_relu_backward: self_is_result with a negative slope (eager raises)")
    return ("where", ("gt", x, 0.0), g, ("mul", g, slope))


def _elu_backward(g, alpha, scale, input_scale, is_result, y):
    alpha, scale, ins = (_scalar(v, "elu scalar") for v in (alpha, scale, input_scale))
    neg_coef = alpha * scale
    if is_result:  # y <= 0 ? g * input_scale * (y + alpha * scale) : g * scale
        if alpha < 0:
            raise ExprError("elu_backward: is_result with a negative alpha (eager raises)")
        neg = ("mul", _scale(g, ins), ("add", y, neg_coef))
    else:  # x <= 0 ? g * input_scale * alpha * scale * exp(x * input_scale) : g * scale
        neg = ("mul", _scale(g, ins * neg_coef), ("exp", _scale(y, ins)))
    return ("where", ("le", y, 0.0), neg, _scale(g, scale))


def _hardswish_backward(g, x):  # x <= -3 ? 0 : x < 3 ? g * (x / 3 + 0.5) : g
    mid = ("mul", g, ("add", ("div", x, 3.0), 0.5))
    return ("where", ("le", x, -3.0), 0.0, ("where", ("lt", x, 3.0), mid, g))


def _hardsigmoid_backward(g, x):  # -3 < x < 3 ? g / 6 : 0 (NaN x: 0)
    inside = ("where", ("lt", x, 3.0), ("mul", g, 1.0 / 6.0), 0.0)
    return ("where", ("gt", x, -3.0), inside, 0.0)


def _softplus_backward(g, x, beta, threshold):
    # ATen: z = exp(x * beta); x * beta > threshold ? g : g * z / (z + 1)
    beta, threshold = _scalar(beta, "beta"), _scalar(threshold, "threshold")
    xb = _scale(x, beta)
    z = ("exp", xb)
    return ("where", ("gt", xb, threshold), g, ("div", ("mul", g, z), ("add", z, 1.0)))


def _mish_backward(g, x):
    # ATen: g * (t + x * sigmoid(x) * (1 - t * t)), t = tanh(log1p(exp(x)))
    t = ("tanh", ("log1p", ("exp", x)))
    inner = ("mul", ("mul", x, ("sigmoid", x)), ("sub", 1.0, ("mul", t, t)))
    return ("mul", g, ("add", t, inner))


#: kind -> ((argument name, default), ...), builder: ATen activations written out
_ACTIVATIONS: dict[str, tuple[tuple[tuple[str, Any], ...], Callable[..., Any]]] = {
    "clamp": ((("self", _REQUIRED), ("min", None), ("max", None)), _clamp),
    "hardtanh": ((("self", _REQUIRED), ("min_val", -1.0), ("max_val", 1.0)), _hardtanh),
    "leaky_relu": ((("self", _REQUIRED), ("negative_slope", 0.01)), _leaky_relu),
    "elu": (
        (("self", _REQUIRED), ("alpha", 1.0), ("scale", 1.0), ("input_scale", 1.0)),
        _elu,
    ),
    "softplus": ((("self", _REQUIRED), ("beta", 1.0), ("threshold", 20.0)), _softplus),
    "hardswish": ((("self", _REQUIRED),), _hardswish),
    "hardsigmoid": ((("self", _REQUIRED),), _hardsigmoid),
    "mish": ((("self", _REQUIRED),), _mish),
    "hardtanh_backward": (
        (
            ("grad_output", _REQUIRED),
            ("self", _REQUIRED),
            ("min_val", _REQUIRED),
            ("max_val", _REQUIRED),
        ),
        _hardtanh_backward,
    ),
    "leaky_relu_backward": (
        (
            ("grad_output", _REQUIRED),
            ("self", _REQUIRED),
            ("negative_slope", _REQUIRED),
            ("self_is_result", _REQUIRED),
        ),
        _leaky_relu_backward,
    ),
    "elu_backward": (
        (
            ("grad_output", _REQUIRED),
            ("alpha", _REQUIRED),
            ("scale", _REQUIRED),
            ("input_scale", _REQUIRED),
            ("is_result", _REQUIRED),
            ("self_or_result", _REQUIRED),
        ),
        _elu_backward,
    ),
    "hardswish_backward": ((("grad_output", _REQUIRED), ("self", _REQUIRED)), _hardswish_backward),
    "hardsigmoid_backward": (
        (("grad_output", _REQUIRED), ("self", _REQUIRED)),
        _hardsigmoid_backward,
    ),
    "softplus_backward": (
        (
            ("grad_output", _REQUIRED),
            ("self", _REQUIRED),
            ("beta", _REQUIRED),
            ("threshold", _REQUIRED),
        ),
        _softplus_backward,
    ),
    "mish_backward": ((("grad_output", _REQUIRED), ("self", _REQUIRED)), _mish_backward),
}


def _gelu_derivative(x: Any, approximate: str) -> Any:
    """d gelu(x) / dx as a node, ATen's formulas (``gelu_backward``)."""
    if approximate == "tanh":
        beta, kappa = math.sqrt(2.0 / math.pi), 0.044715
        inner = ("mul", ("add", x, ("mul", ("mul", ("mul", x, x), x), kappa)), beta)
        t = ("tanh", inner)
        left_d = ("mul", ("add", t, 1.0), 0.5)
        right_d = ("mul", ("mul", x, 0.5), ("sub", 1.0, ("mul", t, t)))
        right_d = ("mul", right_d, ("mul", ("add", ("mul", ("mul", x, x), 3.0 * kappa), 1.0), beta))
        return ("add", left_d, right_d)
    if approximate != "none":
        raise ExprError(f"gelu_backward: approximate={approximate!r} is not supported")
    cdf = ("mul", ("add", ("erf", ("mul", x, math.sqrt(0.5))), 1.0), 0.5)
    pdf = ("mul", ("exp", ("mul", ("mul", x, x), -0.5)), 1.0 / math.sqrt(2.0 * math.pi))
    return ("add", cdf, ("mul", x, pdf))


def _no_kwargs(target, kwargs) -> None:
    if kwargs:
        raise ExprError(f"{target}: keyword argument(s) {sorted(kwargs)} are not supported")
