"""Pointwise expression DAGs: their format, dtype rules, a printer to Triton source and
an eager (torch) evaluator.  The mapping from ATen pointwise ops is :mod:`.pointwise_aten`.

The fusion pass turns the ATen pointwise ops around a kernel's anchor (a GEMM's output, a
softmax's input) into one *expression* that a kernel template writes into its source.

Expression format (plain nested tuples; JSON lists once serialised):

* leaves: ``"ACC"`` (the anchor's value: for a GEMM ``alpha * (A @ B) + bias`` in fp32),
  ``"ACC1"`` (the second accumulator of a dual GEMM, ``A @ B1 + bias1``: only
  ``tile::dual_mm_epilogue`` reads it) and ``"IN0"``, ``"IN1"``, ... (extra input tensors,
  broadcast to the output shape and read through their strides; ``INk`` is ``extras[k]``);
* constants: Python ``int`` / ``float`` (``inf`` / ``nan`` allowed), normalised to float;
* nodes ``(kind, *operands)``:

  - unary: ``neg exp log tanh sigmoid relu silu erf rsqrt sqrt abs reciprocal
    logical_not log1p expm1 sin cos sign``;
  - binary: ``add sub mul div pow maximum minimum lt le gt ge eq ne logical_and
    logical_or`` (``pow``'s exponent may be a constant or an expression);
  - ``("gelu", x, "none" | "tanh")``, ``("where", cond, a, b)``, ``("to", x, dtype)``
    with ``dtype`` a name: ``"float32" "float16" "bfloat16" "bool"``.

Other ATen activations have no node of their own: :func:`.pointwise_aten.from_aten`
writes them out with ATen's formulas (``clamp`` / ``hardtanh`` as ``maximum`` / ``minimum``, which keep NaN;
``leaky_relu elu softplus hardswish hardsigmoid mish`` and the ``*_backward`` ops of these
and of ``gelu tanh sigmoid silu`` and ReLU's ``threshold_backward``).  For a NaN saved
input the backwards follow ATen's scalar / CUDA formulas (ATen's CPU vector path differs).

The same sub-expression written twice (``x`` in ``x * x * x``) is one value: the printer
emits each distinct sub-tree once.  :func:`dumps` gives the canonical string (compact JSON,
constants as floats) that ``tile::`` ops take as ``expr``; :func:`loads` reverses it.
GPT-2's written-out tanh-GELU over the GEMM accumulator is::

    ["mul",["mul","ACC",0.5],["add",["tanh",["mul",["add","ACC",["mul",["pow","ACC",3.0],
    0.044715]],0.7978845608028654]],1.0]]

Dtype rules (what the *result* dtype is, as eager computes it): tensor-tensor operands
promote with ``torch.promote_types``; a Python constant never widens a tensor of its own
category (``fp16_tensor * 0.5`` is fp16) but lifts a bool / int tensor to float32;
floating functions (``exp`` .. ``rsqrt``, ``log1p expm1 sin cos``, ``div``) of a bool /
int give float32; comparisons and ``logical_not / _and / _or`` give bool; ``sign`` keeps
its operand's dtype; ``where`` promotes its two branches; ``to``
gives its dtype.  ``ACC``'s dtype is the GEMM output's (its input dtype).

Numerics of the generated code: every value is computed in fp32 (bools as ``int1``); an
intermediate is *not* rounded to its eager dtype, except at an explicit ``to``: a cast to
fp16 / bf16 round-trips (``x.to(tl.float16).to(tl.float32)``), so ``.to(fp16)`` in the
middle of an expression rounds like eager.  The final value is stored in the result dtype.
This is Inductor's choice too: results are at least as accurate as eager's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "BINARY",
    "DTYPE_NAMES",
    "UNARY",
    "ExprError",
    "canonical",
    "dumps",
    "evaluate",
    "infer_dtype",
    "input_leaves",
    "loads",
    "print_triton",
    "validate",
]

UNARY = (
    "neg",
    "exp",
    "log",
    "tanh",
    "sigmoid",
    "relu",
    "silu",
    "erf",
    "rsqrt",
    "sqrt",
    "abs",
    "reciprocal",
    "logical_not",
    "log1p",
    "expm1",
    "sin",
    "cos",
    "sign",
)
BINARY = (
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "maximum",
    "minimum",
    "lt",
    "le",
    "gt",
    "ge",
    "eq",
    "ne",
    "logical_and",
    "logical_or",
)
_COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
_LOGICAL = ("logical_not", "logical_and", "logical_or")
#: unary ops that give a float result for a bool / int input (eager's int-to-float rule)
_FLOAT_UNARY = (
    "exp",
    "log",
    "tanh",
    "sigmoid",
    "silu",
    "erf",
    "rsqrt",
    "sqrt",
    "reciprocal",
    "log1p",
    "expm1",
    "sin",
    "cos",
)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bool": torch.bool,
}
_NAME_OF = {v: k for k, v in DTYPE_NAMES.items()}


class ExprError(ValueError):
    """A malformed or unsupported pointwise expression."""


# --- format ----------------------------------------------------------------------------


def _is_leaf(e: Any) -> bool:
    return isinstance(e, str) and (e in ("ACC", "ACC1") or (e.startswith("IN") and e[2:].isdigit()))


def canonical(expr: Any) -> Any:
    """``expr`` with lists as tuples, constants as floats, dtypes as names; validated.
    Memoised for hashable expressions (the tile ops re-read theirs on every call)."""
    try:
        hash(expr)
    except TypeError:  # lists: not memoised
        return _canonical(expr)
    return _canonical_memo(expr)


def _canonical(expr: Any) -> Any:
    if isinstance(expr, (list, tuple)):
        if not expr or not isinstance(expr[0], str):
            raise ExprError(f"a node must start with its kind: {expr!r}")
        kind, ops = expr[0], list(expr[1:])
        if kind == "to":
            if len(ops) != 2:
                raise ExprError(f"'to' takes (x, dtype): {expr!r}")
            dt = ops[1]
            name = _NAME_OF.get(dt) if isinstance(dt, torch.dtype) else dt
            if name not in DTYPE_NAMES:
                raise ExprError(f"cast to {dt!r} is not supported (one of {list(DTYPE_NAMES)})")
            return ("to", canonical(ops[0]), name)
        if kind == "gelu":
            approx = ops[1] if len(ops) > 1 else "none"
            if len(ops) not in (1, 2) or approx not in ("none", "tanh"):
                raise ExprError(f"'gelu' takes (x, 'none' | 'tanh'): {expr!r}")
            return ("gelu", canonical(ops[0]), approx)
        if kind == "rand":
            if len(ops) != 1 or not _is_leaf(ops[0]) or not ops[0].startswith("IN"):
                raise ExprError(f"'rand' takes one seed input (an 'INk' leaf): {expr!r}")
            return ("rand", ops[0])
        arity = 1 if kind in UNARY else 2 if kind in BINARY else 3 if kind == "where" else None
        if arity is None:
            raise ExprError(f"unknown node kind {kind!r}")
        if len(ops) != arity:
            raise ExprError(f"{kind!r} takes {arity} operand(s), got {len(ops)}: {expr!r}")
        return (kind, *(canonical(o) for o in ops))
    if _is_leaf(expr):
        return expr
    if isinstance(expr, bool):
        return float(expr)
    if isinstance(expr, (int, float)):
        return float(expr)
    raise ExprError(f"not an expression: {expr!r}")


_canonical_memo = functools.lru_cache(maxsize=4096)(_canonical)


def validate(expr: Any) -> Any:
    """Alias of :func:`canonical` (raises :class:`ExprError` when malformed)."""
    return canonical(expr)


def dumps(expr: Any) -> str:
    """The canonical string of ``expr`` (what ``tile::`` ops take as ``expr``)."""
    return _dumps(canonical(expr))


@functools.lru_cache(maxsize=4096)
def _dumps(expr: Any) -> str:
    return json.dumps(expr, separators=(",", ":"), allow_nan=True)


def loads(s: str) -> Any:
    """Parse a string made by :func:`dumps` (or hand-written JSON of the same shape).
    A bare leaf name (``ACC``: never JSON, whose strings are quoted) is an expression
    parsed already, and is returned as it is."""
    if isinstance(s, str) and _LEAF_NAME.fullmatch(s):
        return s
    return _loads(s) if isinstance(s, str) else _loads.__wrapped__(s)


_LEAF_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


@functools.lru_cache(maxsize=4096)
def _loads(s: str) -> Any:
    try:
        raw = json.loads(s)
    except (TypeError, ValueError) as e:
        raise ExprError(f"expression is not valid JSON: {e}") from None
    return canonical(raw)


def _leaves(expr: Any, seeds: bool, values: bool) -> frozenset[str]:
    """The leaves ``expr`` reads as ``rand`` seeds and / or as values."""
    return _leaves_of(canonical(expr), seeds, values)


@functools.lru_cache(maxsize=4096)
def _leaves_of(expr: Any, seeds: bool, values: bool) -> frozenset[str]:
    out: set[str] = set()

    def walk(e, as_seed: bool):
        if isinstance(e, tuple):
            for o in e[1:]:
                walk(o, e[0] == "rand")
        elif _is_leaf(e) and (seeds if as_seed else values):
            out.add(e)

    walk(expr, False)
    return frozenset(out)


def input_leaves(expr: Any) -> frozenset[str]:
    """The leaves (``"ACC"``, ``"ACC1"``, ``"IN0"``, ...) that ``expr`` reads."""
    return _leaves(expr, seeds=True, values=True)


def seed_leaves(expr: Any) -> frozenset[str]:
    """The leaves that ``expr`` reads as a ``rand`` seed."""
    return _leaves(expr, seeds=True, values=False)


def value_leaves(expr: Any) -> frozenset[str]:
    """The leaves that ``expr`` reads as values (not as a ``rand`` seed)."""
    return _leaves(expr, seeds=False, values=True)


def uniform_reference(seed: torch.Tensor, shape: Sequence[int], device: Any) -> torch.Tensor:
    """``rand`` evaluated with eager ops: float32 uniform in [0, 1) of ``shape``, from a
    CPU generator seeded with ``seed`` (the kernels' stream is Philox keyed by the seed
    and the flat index: the same distribution, other numbers)."""
    gen = torch.Generator().manual_seed(int(seed.reshape(-1)[0].item()) & (2**63 - 1))
    return torch.rand(tuple(shape), generator=gen).to(device)


# --- dtypes ----------------------------------------------------------------------------

_WEAK = "weak"  # a Python constant's dtype: float category, never widens a tensor


@dataclasses.dataclass(frozen=True)
class ZeroDim:
    """A leaf's dtype when the leaf is a 0-dim tensor.  In eager's type promotion a 0-dim
    tensor only widens values of a lower category: ``fp16 * fp32_0dim`` is fp16, while
    ``int32 * fp16_0dim`` is fp16."""

    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.dtype}[0-dim]"


# a value's (dtype, tier): eager promotes within the highest tier present, and a lower
# tier only where its category is higher (c10's ResultTypeState)
_T_WEAK, _T_ZERO, _T_DIM = 0, 1, 2


def _category(dt) -> int:
    if dt == _WEAK:
        return 2
    if dt == torch.bool:
        return 0
    return 2 if dt.is_floating_point else 1


def _combine(higher, lower):
    """The dtype of ``higher`` (from the higher tier) meeting ``lower``."""
    if lower == _WEAK:
        return higher if _category(higher) >= 2 else torch.float32
    if higher.is_floating_point:
        return higher
    if higher == torch.bool or lower.is_floating_point:
        return torch.promote_types(higher, lower)
    return higher


def _promote(a: tuple, b: tuple) -> tuple:
    (da, ta), (db, tb) = a, b
    if ta == tb:
        if da == _WEAK or db == _WEAK:
            return a if db == _WEAK else b
        return torch.promote_types(da, db), ta
    (dh, th), (dl, _) = (a, b) if ta > tb else (b, a)
    return _combine(dh, dl), th


def infer_dtype(expr: Any, leaf_dtypes: Mapping[str, Any]) -> torch.dtype:
    """The dtype eager gives ``expr`` when its leaves have ``leaf_dtypes`` (a dtype, or
    :class:`ZeroDim` for a 0-dim tensor leaf)."""
    e = canonical(expr)
    try:
        return _infer_memo(e, tuple(sorted(leaf_dtypes.items(), key=lambda kv: kv[0])))
    except TypeError:  # unhashable (a list expression): not memoised
        return _dtype_of(leaf_dtypes)(e)


@functools.lru_cache(maxsize=4096)
def _infer_memo(expr: Any, leaf_dtypes: tuple) -> torch.dtype:
    return _dtype_of(dict(leaf_dtypes))(expr)


def _dtype_of(leaf_dtypes: Mapping[str, Any]) -> Callable[[Any], torch.dtype]:
    """A memoised ``node -> eager dtype`` for canonical nodes (constants: float32)."""
    memo: dict[Any, Any] = {}

    def go(e) -> tuple:
        if isinstance(e, float):
            return _WEAK, _T_WEAK
        if isinstance(e, str):
            if e not in leaf_dtypes:
                raise ExprError(f"no dtype given for leaf {e!r}")
            d = leaf_dtypes[e]
            return (d.dtype, _T_ZERO) if isinstance(d, ZeroDim) else (d, _T_DIM)
        if e in memo:
            return memo[e]
        kind = e[0]
        if kind == "to":
            r = DTYPE_NAMES[e[2]], go(e[1])[1]
        elif kind == "rand":
            r = torch.float32, _T_DIM
        elif kind in _COMPARE or kind in _LOGICAL:
            r = torch.bool, max(_T_ZERO, *(go(o)[1] for o in e[1:]))
        elif kind == "where":
            d, t = _promote(go(e[2]), go(e[3]))
            r = d, max(t, go(e[1])[1])
        elif kind in BINARY:
            d, t = _promote(go(e[1]), go(e[2]))
            if kind in ("div", "pow") and d != _WEAK and _category(d) < 2:
                d = torch.float32
            r = d, t
        else:  # unary, gelu
            d, t = go(e[1])
            if d != _WEAK and _category(d) < 2 and kind in (*_FLOAT_UNARY, "gelu"):
                d = torch.float32
            if kind == "neg" and d == torch.bool:
                raise ExprError("neg of a bool is not defined (eager raises)")
            r = d, t
        memo[e] = r
        return r

    def dtype(e):
        r = go(e)[0]
        return torch.float32 if r == _WEAK else r

    return dtype


# --- printer ---------------------------------------------------------------------------


def _lit(v: float) -> str:
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else '-float("inf")'
    return repr(float(v))


_ROUND = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
_GELU_K = 0.7978845608028654  # sqrt(2 / pi)
_SQRT1_2 = 0.7071067811865476


def print_triton(
    expr: Any,
    leaves: Mapping[str, str],
    bool_leaves: Sequence[str] = (),
    prefix: str = "_e",
    use_libdevice: bool | None = None,
    leaf_dtypes: Mapping[str, torch.dtype] | None = None,
    index: str | None = None,
) -> tuple[list[str], str, bool]:
    """Triton statements computing ``expr``; returns ``(lines, result_name, is_constant)``.

    ``leaves`` maps each leaf (``"ACC"``, ``"INk"``) to the name of an fp32 block already
    in scope (``int1`` for the names in ``bool_leaves``).  Every statement assigns a fresh
    ``{prefix}{n}``; the result is fp32 (a bool result is converted to 0.0 / 1.0).
    ``is_constant`` says the result is a Python float (no leaf was read): the caller
    broadcasts it.  Lines have no indentation.

    With ``leaf_dtypes``, a cast first rounds its operand to the operand's own eager dtype
    when that is fp16 / bf16 (``x16.to(float32)``: eager's ``x16`` was rounded), so a cast
    rounds exactly where eager's value was rounded.

    ``use_libdevice`` (default: not in Triton's interpreter, which does not implement
    libdevice): ``tanh`` and a general ``pow`` call ``libdevice`` (``from
    triton.language.extra import libdevice`` must be in scope); otherwise they are written
    with ``tl.exp`` / ``tl.exp2`` / ``tl.log2`` (tanh to ~1e-7 absolute; a general pow as
    ``exp2(p * log2(|x|))`` with the sign of an odd integer power, NaN for a negative base
    and a non-integer power).
    """
    lines, (res,), (const,) = print_triton_many(
        [expr], leaves, bool_leaves, prefix, use_libdevice, leaf_dtypes, index
    )
    return lines, res, const


def print_triton_many(
    exprs: Sequence[Any],
    leaves: Mapping[str, str],
    bool_leaves: Sequence[str] = (),
    prefix: str = "_e",
    use_libdevice: bool | None = None,
    leaf_dtypes: Mapping[str, torch.dtype] | None = None,
    index: str | None = None,
) -> tuple[list[str], list[str], list[bool]]:
    """:func:`print_triton` for several expressions over the same leaves, in one body:
    a sub-tree they share is computed once.  Returns ``(lines, result names, is_constant
    flags)``, one name and flag per expression, in order.

    ``index`` names the block of each element's flat index in the result (int32), which
    ``rand`` needs: ``tl.rand(seed, index)``, the seed leaf being a scalar int64 in scope;
    without it an expression with ``rand`` raises :class:`ExprError`."""
    if use_libdevice is None:
        from .._compat import interpret_mode

        use_libdevice = not interpret_mode()
    dtype_of = _dtype_of(leaf_dtypes) if leaf_dtypes is not None else None
    lines: list[str] = []
    memo: dict[Any, tuple[str, bool]] = {}  # sub-tree -> (name or literal, is_bool)
    counter = [0]

    def fresh(code: str, is_bool: bool = False) -> tuple[str, bool]:
        name = f"{prefix}{counter[0]}"
        counter[0] += 1
        lines.append(f"{name} = {code}")
        return name, is_bool

    def as_f(v: tuple[str, bool]) -> str:
        return f"{v[0]}.to(tl.float32)" if v[1] else v[0]

    def as_b(v: tuple[str, bool]) -> str:
        return v[0] if v[1] else f"({v[0]} != 0.0)"

    def tanh(x: str) -> str:
        if use_libdevice:
            return f"libdevice.tanh({x})"
        t = fresh(f"tl.exp(-2.0 * tl.abs({x}))")[0]
        return f"tl.where({x} < 0.0, -1.0, 1.0) * (1.0 - {t}) / (1.0 + {t})"

    def log1p(x: str) -> str:
        if use_libdevice:
            return f"libdevice.log1p({x})"
        # Goldberg: log(u) * x / (u - 1), u = 1 + x, exact where u rounds to 1 (or is inf)
        u = fresh(f"1.0 + {x}")[0]
        exact = f'({u} == 1.0) | ({u} == float("inf"))'
        return f"tl.where({exact}, {x}, tl.log({u}) * ({x} / ({u} - 1.0)))"

    def expm1(x: str) -> str:
        if use_libdevice:
            return f"libdevice.expm1({x})"
        # Kahan: (u - 1) * x / log(u), u = exp(x); x where u rounds to 1, -1 / inf as is
        u = fresh(f"tl.exp({x})")[0]
        d = fresh(f"{u} - 1.0")[0]
        return (
            f'tl.where({u} == 1.0, {x}, tl.where(({d} == -1.0) | ({u} == float("inf")), '
            f"{d}, {d} * {x} / tl.log({u})))"
        )

    def gpow(a: str, b: str) -> str:
        if use_libdevice:
            return f"libdevice.pow({a}, {b})"
        return f"tl.exp2({b} * tl.log2({a}))"

    def go(e) -> tuple[str, bool]:
        if isinstance(e, float):
            return _lit(e), False
        if isinstance(e, str):
            if e not in leaves:
                raise ExprError(f"leaf {e!r} has no input")
            return leaves[e], e in bool_leaves
        if e in memo:
            return memo[e]
        kind = e[0]
        if kind == "rand":
            if index is None:
                raise ExprError("'rand' needs the element index, which this kernel lacks")
            r = fresh(f"tl.rand({leaves[e[1]]}, {index})")
        elif kind == "to":
            x = go(e[1])
            src = dtype_of(e[1]) if dtype_of is not None else None
            if src in _ROUND and _NAME_OF[src] != e[2] and not x[1]:
                x = fresh(f"{x[0]}.to({_ROUND[src]}).to(tl.float32)")
            if e[2] == "bool":
                r = x if x[1] else fresh(f"{x[0]} != 0.0", True)
            elif e[2] == "float32":
                r = fresh(as_f(x)) if x[1] else x
            else:
                tname = {"float16": "tl.float16", "bfloat16": "tl.bfloat16"}[e[2]]
                r = fresh(f"({as_f(x)}).to({tname}).to(tl.float32)")
        elif kind == "gelu":
            x = as_f(go(e[1]))
            if e[2] == "tanh":
                inner = fresh(f"{_GELU_K!r} * ({x} + 0.044715 * {x} * {x} * {x})")
                th = tanh(inner[0])
                r = fresh(f"0.5 * {x} * (1.0 + {th})")
            else:
                r = fresh(f"0.5 * {x} * (1.0 + tl.math.erf({x} * {_SQRT1_2!r}))")
        elif kind == "where":
            c, a, b = go(e[1]), go(e[2]), go(e[3])
            r = fresh(f"tl.where({as_b(c)}, {as_f(a)}, {as_f(b)})")
        elif kind in _COMPARE:
            op = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[kind]
            r = fresh(f"{as_f(go(e[1]))} {op} {as_f(go(e[2]))}", True)
        elif kind == "logical_not":
            r = fresh(f"{as_b(go(e[1]))} == 0", True)
        elif kind in ("logical_and", "logical_or"):
            op = "&" if kind == "logical_and" else "|"
            r = fresh(f"({as_b(go(e[1]))}) {op} ({as_b(go(e[2]))})", True)
        elif kind == "sign" and go(e[1])[1]:  # sign of a bool is itself
            r = go(e[1])
        elif kind in BINARY:
            a, b = as_f(go(e[1])), e[2]
            if kind == "pow" and isinstance(b, float):
                r = _pow_const(a, b, fresh, use_libdevice)
            else:
                bs = as_f(go(b))
                if kind in ("add", "sub", "mul", "div"):
                    op = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[kind]
                    r = fresh(f"{a} {op} {bs}")
                elif kind == "pow":
                    if isinstance(e[1], float):  # constant base: make it a block
                        a = f"(tl.zeros_like({bs}) + {a})"
                    r = fresh(gpow(a, bs))
                else:
                    fn = "tl.maximum" if kind == "maximum" else "tl.minimum"
                    r = fresh(f"{fn}({a}, {bs}, propagate_nan=tl.PropagateNan.ALL)")
        else:
            x = as_f(go(e[1]))
            code = {
                # x * -1, not -x: triton < 3.7 compiles -x as 0 - x, which loses -0.0
                "neg": f"{x} * -1.0",
                "exp": f"tl.exp({x})",
                "log": f"tl.log({x})",
                "tanh": None,
                "sigmoid": f"1.0 / (1.0 + tl.exp(-{x}))",
                "relu": f"tl.where({x} < 0.0, 0.0, {x})",  # NaN stays NaN, like torch.relu
                "silu": f"{x} / (1.0 + tl.exp(-{x}))",
                "erf": f"tl.math.erf({x})",
                "rsqrt": f"tl.rsqrt({x})",
                "sqrt": f"tl.sqrt({x})",
                "abs": f"tl.abs({x})",
                "reciprocal": f"1.0 / {x}",
                "log1p": None,
                "expm1": None,
                "sin": f"libdevice.sin({x})" if use_libdevice else f"tl.sin({x})",
                "cos": f"libdevice.cos({x})" if use_libdevice else f"tl.cos({x})",
                # torch.sign: -1 / 0 / 1, and 0 for NaN and -0.0 ((0 < x) - (x < 0))
                "sign": f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))",
            }[kind]
            if code is None:
                code = {"tanh": tanh, "log1p": log1p, "expm1": expm1}[kind](x)
            r = fresh(code)
        memo[e] = r
        return r

    results, constants = [], []
    for expr in exprs:
        e0 = canonical(expr)
        res = go(e0)
        if res[1]:
            res = fresh(f"{res[0]}.to(tl.float32)")
        results.append(res[0])
        constants.append(not input_leaves(e0))
    return lines, results, constants


def _pow_const(a: str, p: float, fresh: Callable, use_libdevice: bool) -> tuple[str, bool]:
    """``a ** p`` for a constant ``p``: the small integer and half powers as products /
    roots (what ATen's pow kernels do), else libdevice's pow."""
    if p == 0.0:
        return fresh(f"tl.zeros_like({a}) + 1.0")  # pow(x, 0) = 1, also for NaN / inf
    if p == 1.0:
        return a, False
    if p == 2.0:
        return fresh(f"{a} * {a}")
    if p == 3.0:
        return fresh(f"{a} * {a} * {a}")
    if p == 0.5:
        return fresh(f"tl.sqrt({a})")
    if p == -0.5:
        return fresh(f"tl.rsqrt({a})")
    if p == -1.0:
        return fresh(f"1.0 / {a}")
    if p == -2.0:
        return fresh(f"1.0 / ({a} * {a})")
    if use_libdevice or not math.isfinite(p):
        return fresh(f"libdevice.pow({a}, {_lit(p)})")
    mag = fresh(f"tl.exp2({_lit(p)} * tl.log2(tl.abs({a})))")[0]
    if p == int(p):
        if int(p) % 2:  # the sign of ``a``, -0.0's included (1 / -0.0 is -inf)
            return fresh(f"tl.where(({a} < 0.0) | (1.0 / {a} < 0.0), {mag} * -1.0, {mag})")
        return mag, False
    return fresh(f'tl.where({a} < 0.0, float("nan"), {mag})')


# --- eager evaluator (fallbacks and tests) --------------------------------------------


def evaluate(expr: Any, leaves: Mapping[str, Any], shape: Sequence[int] | None = None) -> Any:
    """Evaluate ``expr`` with eager torch ops (eager's dtypes and rounding at every step).

    ``leaves`` maps ``"ACC"`` / ``"INk"`` to tensors.  This is what the kernels fall back
    to, and the reference of the tests.  ``shape`` is the result's, which ``rand`` needs
    (:func:`uniform_reference`).
    """
    import torch.nn.functional as F

    memo: dict[Any, Any] = {}

    def go(e):
        if isinstance(e, float):
            return e
        if isinstance(e, str):
            return leaves[e]
        if e in memo:
            return memo[e]
        kind = e[0]
        if kind == "rand":
            if shape is None:
                raise ExprError("'rand' needs the result's shape")
            seed = leaves[e[1]]
            r = uniform_reference(seed, shape, seed.device)
        elif kind == "to":
            r = _to(go(e[1]), DTYPE_NAMES[e[2]])
        elif kind == "gelu":
            r = F.gelu(_t(go(e[1])), approximate=e[2])
        elif kind == "where":
            c = go(e[1])
            r = torch.where(
                _t(c).bool() if not isinstance(c, torch.Tensor) else c, go(e[2]), go(e[3])
            )
        elif kind in BINARY:
            a, b = go(e[1]), go(e[2])
            r = _BIN[kind](a, b)
        else:
            x = go(e[1])
            r = _UN[kind](_t(x))
        memo[e] = r
        return r

    return go(canonical(expr))


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


def _to(x, dt):
    return x.to(dt) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dt)


def _max(a, b):
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp_min(a, b)


def _min(a, b):
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp_max(a, b)


_BIN: dict[str, Callable[[Any, Any], Any]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a**b,
    "maximum": _max,
    "minimum": _min,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "logical_and": lambda a, b: torch.logical_and(_t(a), _t(b)),
    "logical_or": lambda a, b: torch.logical_or(_t(a), _t(b)),
}
_UN: dict[str, Callable[[Any], Any]] = {
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "silu": lambda x: torch.nn.functional.silu(x),
    "erf": torch.erf,
    "rsqrt": torch.rsqrt,
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "reciprocal": torch.reciprocal,
    "logical_not": torch.logical_not,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "sin": torch.sin,
    "cos": torch.cos,
    "sign": torch.sign,
}
