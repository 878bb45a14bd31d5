"""Shape reasoning with sympy over the ShapeEnv's expressions.

The rewrite never specialises silently.  A fact about symbolic sizes is either

* **proven** here from the expressions and the ShapeEnv's value ranges, with no guard
  (``Facts.prove_*`` return True / False), or
* **unknown** (None): then it becomes a run-time choice inside the launcher, which
  re-checks the real sizes on every call and picks a kernel variant or the ATen path.

Checks therefore see sizes at their *hints* (``hinted``): deciding on a hint adds no
guard, and the launcher covers every other size.  Guards the ShapeEnv gains while we
rewrite are counted (``GuardWatch``) and listed by ``explain()``; there should be none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import sympy
import torch

from .. import _compat


def _expr(x: Any) -> sympy.Expr | None:
    """The sympy expression of an int or SymInt (None for anything else)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    if isinstance(x, sympy.Expr):
        return x
    return None


def is_symbolic(x: Any) -> bool:
    e = _expr(x)
    return e is not None and bool(e.free_symbols)


#: The example value of an unbacked size (``x[mask]``'s rows): a generic large size.
_UNBACKED_HINT = 8192


def hint(x: Any) -> Any:
    """A SymInt's example value (no guard); ints pass through."""
    if isinstance(x, torch.SymInt):
        node = x.node
        if getattr(node, "hint", None) is not None:
            return int(node.hint)
        return _compat.size_hint(node.shape_env, node.expr, fallback=_UNBACKED_HINT)
    return x


@dataclasses.dataclass
class Facts:
    """Proofs about symbolic sizes, using only the ShapeEnv's known ranges."""

    shape_env: Any = None

    def bounds(self, x: Any) -> tuple[float, float]:
        e = _expr(x)
        if e is None:
            return (-math.inf, math.inf)
        if not e.free_symbols:
            return (int(e), int(e))
        if self.shape_env is not None:
            try:
                vr = self.shape_env.bound_sympy(e)
                return (_num(vr.lower), _num(vr.upper))
            except Exception:
                pass
        return (-math.inf, math.inf)

    def _decide(self, rel: Any) -> bool | None:
        if rel in (sympy.true, True):
            return True
        if rel in (sympy.false, False):
            return False
        if self.shape_env is not None:
            return _compat.static_eval(self.shape_env, rel)
        return None

    def prove_eq(self, a: Any, b: Any) -> bool | None:
        ea, eb = _expr(a), _expr(b)
        if ea is None or eb is None:
            return None
        diff = sympy.simplify(ea - eb)
        if diff == 0:
            return True
        if not diff.free_symbols:
            return False
        res = self._decide(sympy.Eq(ea, eb))
        if res is not None:
            return res
        lo, hi = self.bounds(diff)
        if lo > 0 or hi < 0:
            return False
        return None

    def prove_le(self, a: Any, b: Any) -> bool | None:
        """a <= b for every size the ShapeEnv allows?"""
        ea, eb = _expr(a), _expr(b)
        if ea is None or eb is None:
            return None
        res = self._decide(sympy.Le(ea, eb))
        if res is not None:
            return res
        lo, hi = self.bounds(eb - ea)
        if lo >= 0:
            return True
        if hi < 0:
            return False
        return None

    def prove_divisible(self, x: Any, k: int) -> bool | None:
        e = _expr(x)
        if e is None:
            return None
        m = sympy.Mod(e, k)
        if m == 0:
            return True
        if not m.free_symbols:
            return False
        return self._decide(sympy.Eq(m, 0))

    def prove_static(self, x: Any) -> bool:
        e = _expr(x)
        return e is not None and not e.free_symbols

    def prove_contiguous(self, shape: Sequence[Any], stride: Sequence[Any]) -> bool | None:
        """Row-major contiguous (size-1 dims' strides ignored)?"""
        expected: Any = 1
        unknown = False
        for size, st in reversed(list(zip(shape, stride))):
            if self.prove_eq(size, 1):
                continue
            eq = self.prove_eq(st, expected)
            if eq is False:
                return False
            if eq is None:
                unknown = True
            expected = _expr(size) * _expr(expected)
        return None if unknown else True

    def prove_broadcastable(self, a: Sequence[Any], b: Sequence[Any]) -> bool | None:
        unknown = False
        for x, y in zip(reversed(list(a)), reversed(list(b))):
            if self.prove_eq(x, y) or self.prove_eq(x, 1) or self.prove_eq(y, 1):
                continue
            if self.prove_eq(x, y) is False and self.prove_eq(x, 1) is False:
                if self.prove_eq(y, 1) is False:
                    return False
            unknown = True
        return None if unknown else True


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf if str(v) in ("oo", "int_oo") else -math.inf


# --- what checks see ------------------------------------------------------------------


class HintTensor:
    """A fake tensor seen at its size hints: checks read shapes without adding guards.

    Only metadata is available (shape, stride, dtype, device, dim, numel...)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t
        self.shape = torch.Size(hint(s) for s in t.shape)
        self._stride = tuple(hint(s) for s in t.stride())
        self.dtype = t.dtype
        self.device = t.device
        self.requires_grad = t.requires_grad
        self.ndim = t.dim()

    def dim(self) -> int:
        return self.ndim

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def stride(self, d: int | None = None):
        return self._stride if d is None else self._stride[d]

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self, memory_format=None) -> bool:
        return Facts().prove_contiguous(self.shape, self._stride) is not False

    def storage_offset(self) -> int:
        return hint(self._t.storage_offset())

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __repr__(self) -> str:
        return f"HintTensor({list(self.shape)}, {self.dtype}, {self.device})"


def has_symbolic_shape(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (
        any(is_symbolic(s) for s in v.shape) or any(is_symbolic(s) for s in v.stride())
    )


def hinted(v: Any) -> Any:
    """``v`` as a check should see it: symbolic tensors at their hints, SymInts as ints."""
    if isinstance(v, torch.Tensor) and has_symbolic_shape(v):
        return HintTensor(v)
    if isinstance(v, torch.SymInt):
        return hint(v)
    if isinstance(v, (list, tuple)):
        return type(v)(hinted(x) for x in v)
    return v


def describe(values: dict[str, Any], facts: Facts) -> tuple[list[str], list[str]]:
    """(proven facts, run-time checks) about a match's symbolic inputs, for explain."""
    proven: list[str] = []
    runtime: list[str] = []
    for name, v in values.items():
        if not has_symbolic_shape(v):
            continue
        last = v.shape[-1] if v.dim() else 1
        if facts.prove_static(last):
            proven.append(f"{name}: inner size {last} is static")
        else:
            lo, hi = facts.bounds(last)
            runtime.append(
                f"{name}: inner size {last} in [{lo:g}, {hi:g}]: block size / looped "
                "variant chosen at run time"
            )
        contiguous = facts.prove_contiguous(v.shape, v.stride())
        if contiguous:
            proven.append(f"{name}: contiguous")
        elif contiguous is None:
            runtime.append(f"{name}: contiguity unknown: strides passed at run time")
        div = facts.prove_divisible(last, 16)
        if div:
            proven.append(f"{name}: inner size divisible by 16 (vectorised access)")
        elif div is None:
            runtime.append(f"{name}: divisibility of {last} by 16 decided per launch")
    if runtime:
        runtime.append("the launcher re-checks real sizes each call (ATen path if unsupported)")
    return proven, runtime


def symbols_of(gm: torch.fx.GraphModule) -> list[str]:
    """The symbolic sizes the graph's inputs carry."""
    syms: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        vals = list(v.shape) + list(v.stride()) if isinstance(v, torch.Tensor) else [v]
        for s in vals:
            e = _expr(s)
            if e is not None:
                syms.update(str(x) for x in e.free_symbols)
    return sorted(syms)


def shape_env_of(gm: torch.fx.GraphModule) -> Any:
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        mode = getattr(v, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            return mode.shape_env
        if isinstance(v, torch.SymInt):
            return v.node.shape_env
    return None


def shape_env_mark(shape_env: Any) -> tuple:
    """What a trace can add to a ShapeEnv (guards, deferred runtime asserts,
    replacements), counted: equal marks before and after a trace mean it added none."""
    if shape_env is None:
        return ()
    asserts = sum(len(v) for v in getattr(shape_env, "deferred_runtime_asserts", {}).values())
    return len(shape_env.guards), asserts, len(getattr(shape_env, "replacements", {}))


class GuardWatch:
    """Counts guards the ShapeEnv gains inside the block (ours, while rewriting)."""

    def __init__(self, shape_env: Any) -> None:
        self.shape_env = shape_env
        self.added: list[str] = []

    def __enter__(self) -> GuardWatch:
        self._n = len(self.shape_env.guards) if self.shape_env is not None else 0
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.shape_env is not None:
            self.added = [str(g.expr) for g in self.shape_env.guards[self._n :]]
