"""The pattern registry: the built-ins and user patterns share it.

A pattern is a plain PyTorch *search* function, a *replacement*, and a *check* for the
cases the replacement's kernel can't do.  Two forms:

* an **op pattern**: ``search`` is one ATen ``OpOverload`` (say ``aten._softmax.default``)
  and ``replacement`` an op with the same schema and outputs (``tile::softmax``).  Every
  node of that op is a candidate; its arguments reach ``check`` by schema name.
* a **traced pattern**: ``search`` is a function of tensors (and of named scalars, listed
  in ``scalars`` with two distinct example values each).  It is traced to ATen with
  ``example_inputs`` per dtype; the scalars become wildcards.  ``replacement`` is called
  with the matched tensors (as graph proxies) and scalars and must call ops only.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .. import _compat
from ..exc import DuplicatePatternError, PatternError

CheckFn = Callable[..., "str | None | bool"]


@dataclasses.dataclass(eq=False)
class Pattern:
    name: str
    search: Any
    replacement: Any
    check: CheckFn | None = None
    example_inputs: Callable[[torch.dtype], Sequence[Any]] | None = None
    scalars: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    #: extra scalars for the replacement, computed from the matched values; a symbolic
    #: size among them (say ``x.shape[-1]`` under ``dynamic=True``) reaches the
    #: replacement read from the graph (``aten.sym_size``), never baked in at its hint
    derive: Callable[..., dict[str, Any]] | None = None
    priority: int = 0
    builtin: bool = False
    origin: str = "?"

    @property
    def is_op_pattern(self) -> bool:
        return isinstance(self.search, torch._ops.OpOverload)

    def run_check(self, values: dict[str, Any], real: dict[str, Any] | None = None) -> str | None:
        """None when the match is accepted, else the reason it is not.

        ``values`` are what the check decides on: for a built-in, symbolic sizes at their
        hints, so its check adds no guard (its launcher re-checks real sizes at run
        time); for a user pattern, the symbolic values themselves (see
        ``rewrite._run_check``).  A check with a ``_real`` parameter (or ``**kwargs``)
        also gets the symbolic values, for requirements that must hold for every size
        (say, a size baked into the graph)."""
        if self.check is None:
            return None
        kwargs = dict(values)
        if real is not None and _accepts(self.check, "_real"):
            kwargs["_real"] = real
        try:
            res = self.check(**kwargs)
        except Exception as e:  # a check that crashes rejects, it never breaks compiling
            return f"check raised {type(e).__name__}: {e}"
        if isinstance(res, str):  # the reason it refuses
            return res or "check returned an empty reason"
        if res is None or bool(res):  # (None, True, or any truthy value: accepted)
            return None
        return f"check returned {res!r}"


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class Registry:
    def __init__(self) -> None:
        self._patterns: dict[str, Pattern] = {}
        self._order: list[str] = []
        self._lock = threading.RLock()
        self._used: weakref.WeakSet[Pattern] = weakref.WeakSet()  # in compiled graphs
        self._builtins_loaded = False

    def add(self, pattern: Pattern) -> Pattern:
        _validate(pattern)
        with self._lock:
            if pattern.name in self._patterns:
                raise DuplicatePatternError(
                    name=pattern.name,
                    first=self._patterns[pattern.name].origin,
                    second=pattern.origin,
                )
            self._patterns[pattern.name] = pattern
            self._order.append(pattern.name)
        return pattern

    def remove(self, name: str) -> Pattern:
        with self._lock:
            if name not in self._patterns:
                raise KeyError(f"no pattern named {name!r} is registered")
            self._order.remove(name)
            return self._patterns.pop(name)

    def mark_used(self, pattern: Pattern) -> None:
        """``pattern`` replaced something in a compiled graph (see :meth:`warn_if_used`)."""
        self._used.add(pattern)

    def warn_if_used(self, pattern: Pattern) -> None:
        """One warning when ``pattern``, just removed, is in graphs already compiled: those
        keep its replacement until they are compiled again."""
        import warnings

        if pattern in self._used:
            self._used.discard(pattern)
            warnings.warn(
                f"tilebackend: pattern {pattern.name!r} is unregistered, but graphs compiled "
                "while it was registered keep calling its replacement until they are compiled "
                "again (torch._dynamo.reset(), or a new torch.compile)",
                RuntimeWarning,
                stacklevel=3,
            )

    def ensure_builtins(self) -> None:
        """Register the built-in patterns once, lazily (no import-time side effects)."""
        with self._lock:
            if self._builtins_loaded:
                return
            from . import builtins

            staged = Registry()
            staged._builtins_loaded = True
            builtins.register_all(staged)
            for name in staged._order:  # all or nothing
                self.add(staged._patterns[name])
            self._builtins_loaded = True

    def names(self) -> list[str]:
        self.ensure_builtins()
        return list(self._order)

    def get(self, name: str) -> Pattern:
        self.ensure_builtins()
        return self._patterns[name]

    def active(self, enable: Iterable[str] = (), disable: Iterable[str] = ()) -> list[Pattern]:
        """Patterns in force for one compile, highest priority first (stable)."""
        self.ensure_builtins()
        enable, disable = set(enable), set(disable)
        unknown = (enable | disable) - set(self._patterns)
        if unknown:
            from ..exc import InvalidOptionValueError

            raise InvalidOptionValueError(
                name="enable/disable",
                value=sorted(unknown),
                expected="registered pattern names: " + ", ".join(self._order),
            )
        pats = [
            self._patterns[n]
            for n in self._order
            if (not enable or n in enable) and n not in disable
        ]
        return sorted(pats, key=lambda p: -p.priority)


REGISTRY = Registry()


def _validate(p: Pattern) -> None:
    if not isinstance(p.name, str) or not p.name:
        raise PatternError(name=p.name, reason="name must be a non-empty string")
    if p.check is not None and not callable(p.check):
        raise PatternError(name=p.name, reason=f"check must be a function or None, got {p.check!r}")
    if p.is_op_pattern:
        if _compat.always_decomposed(p.search):
            raise PatternError(
                name=p.name,
                reason=f"{p.search} is a composite op: it never reaches an ATen graph "
                "(AOTAutograd decomposes it); write a search function instead",
            )
        if not isinstance(p.replacement, torch._ops.OpOverload):
            raise PatternError(
                name=p.name,
                reason="an op pattern (search is an OpOverload) needs an OpOverload replacement "
                "with the same schema",
            )
        return
    if not callable(p.search):
        raise PatternError(name=p.name, reason="search must be a function or an ATen OpOverload")
    if not callable(p.replacement):
        raise PatternError(name=p.name, reason="replacement must be callable")
    if p.example_inputs is None:
        raise PatternError(name=p.name, reason="a traced pattern needs example_inputs(dtype)")
    params = list(inspect.signature(p.search).parameters)
    for s, vals in p.scalars.items():
        if s not in params:
            raise PatternError(name=p.name, reason=f"scalar {s!r} is not a parameter of search")
        if not (isinstance(vals, (tuple, list)) and len(vals) == 2 and vals[0] != vals[1]):
            raise PatternError(
                name=p.name, reason=f"scalar {s!r} needs two distinct example values"
            )
