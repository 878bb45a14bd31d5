"""Launch plans: a tile op called again with the same metadata replays its launches.

Everything a tile op does on the host before its kernel runs (checking the operands,
folding shapes, laying out strides, choosing the config, building the grid) depends only
on its arguments' metadata and the settings in force, and costs far more than the launch
(tens of microseconds a call).  So :func:`planned` wraps an op's implementation:

1. The first call with a given :func:`~._common.meta_key` (with the inputs' aliasing),
   settings and TF32 flag runs the implementation as is (it may autotune).
2. The second call runs it too, and records what it does: its allocations (through
   :func:`~._common.empty`), its kernel launches (through :func:`~._common.launch`),
   each kernel argument as a constant, an input or an allocation, and the counters.
3. Later calls replay that: allocate, launch each kernel with the new tensors, count.

A call is recorded only if it is replayable: every tensor a kernel reads is an input or
an allocation at its start (a copy made on the host is not), the results are
allocations or views of them, and the host ran no tensor op other than metadata
queries and views (no copy, no ``.item()``, no fill).  Anything else keeps the slow path
for that key, and so does a replay that raises (the implementation then runs, with its
own fallback).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .. import settings
from . import _common  # (which imports this module: only its attributes are used, later)

__all__ = ["Plan", "planned", "recording", "stats", "why_not"]

_tls = threading.local()
_LIMIT = 4096

#: How calls were served, by (op name, "plain" | "recorded" | "replayed" | "unplannable").
stats: collections.Counter[tuple[str, str]] = collections.Counter()
#: Why the last unplannable call of each op was not recorded (debugging).
why_not: dict[str, str] = {}

# Tensor functions a recorded call may run on the host: metadata, views, allocation.
_ALLOWED = frozenset(
    {
        "__get__",  # .shape, .dtype, .device, .ndim, ... (property getters)
        "__len__",
        "__getitem__",  # basic slicing is a view; anything else is caught as a copy
        "as_strided",
        "contiguous",
        "data_ptr",
        "dim",
        "element_size",
        "empty",
        "expand",
        "flatten",
        "full",
        "get_device",
        "is_contiguous",
        "is_floating_point",
        "narrow",
        "numel",
        "permute",
        "reshape",
        "select",
        "size",
        "squeeze",
        "storage_offset",
        "stride",
        "t",
        "to",
        "transpose",
        "unsqueeze",
        "untyped_storage",
        "view",
    }
)
_SAME_OR_VIEW = frozenset({"contiguous", "to", "reshape", "flatten"})  # may copy


def recording() -> _Recording | None:
    """The recording in progress on this thread, if any."""
    return getattr(_tls, "rec", None)


class _Recording(TorchFunctionMode):
    """What one call does: allocations, launches, and whether it stayed replayable."""

    def __init__(self) -> None:
        super().__init__()
        self.allocs: list[torch.Tensor] = []
        self.launches: list[tuple[Callable[..., Any], tuple, dict]] = []  # (fn, args, kwargs)
        self.why: str | None = None
        self.in_launch = False

    def forbid(self, why: str) -> None:
        if self.why is None:
            self.why = why

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_launch:
            return out
        name = getattr(func, "__name__", str(func))
        if name not in _ALLOWED:
            self.forbid(f"the host ran {name}")
        elif name in _SAME_OR_VIEW and isinstance(out, torch.Tensor) and args:
            src = args[0]
            if isinstance(src, torch.Tensor) and out.data_ptr() != src.data_ptr():
                self.forbid(f"{name} copied")
        return out


def on_alloc(t: torch.Tensor) -> None:
    rec = recording()
    if rec is not None:
        rec.allocs.append(t)


def on_launch(kernel: Any, grid: Any, args: tuple, kwargs: dict) -> Any:
    """Launch ``kernel[grid](*args, **kwargs)``, noting it when recording."""
    rec = recording()
    if rec is None:
        return kernel[grid](*args, **kwargs)
    if callable(grid):  # (a grid of the launch's meta-parameters: not recorded)
        rec.forbid("a callable grid")
        return kernel[grid](*args, **kwargs)
    return on_call(kernel[grid], args, kwargs)


def on_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``: a launch, or a host op that writes its results into tensors
    it is given (``out=``); noted when recording, its tensors mapped like a kernel's."""
    rec = recording()
    if rec is None:
        return fn(*args, **kwargs)
    rec.launches.append((fn, args, kwargs))
    rec.in_launch = True
    try:
        return fn(*args, **kwargs)
    finally:
        rec.in_launch = False


def not_replayable(why: str) -> None:
    """Mark the call being recorded (if any) as not replayable (e.g. it timed configs)."""
    rec = recording()
    if rec is not None:
        rec.forbid(why)


# --- plans ---------------------------------------------------------------------------

_IN, _OUT = 0, 1
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Plan:
    """A recorded call: allocations ``(shape, dtype, device)``, launches ``(callable,
    arguments, tensor slots, keywords)`` (the callable is ``kernel[grid]`` or a host op;
    the arguments have None where a tensor goes; a slot is ``(position, from an input?,
    index, dtype to view it as or None)``; keywords are ``()`` or ``(constants, tensor
    slots)``), the result's spec and the counter increments."""

    allocs: tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]
    launches: tuple[tuple[Callable[..., Any], tuple, tuple, tuple], ...]
    result: Any
    counts: tuple[tuple[str, int], ...]
    settings: Any

    def run(self, inputs: list[torch.Tensor]) -> Any:
        outs = [_common.empty(s, dt, dev) for s, dt, dev in self.allocs]
        for fn, template, slots, kwargs in self.launches:
            args = list(template)
            for pos, from_input, i, dt in slots:
                t = inputs[i] if from_input else outs[i]
                args[pos] = t if dt is None else t.view(dt)
            if kwargs:
                kw = dict(kwargs[0])
                for name, from_input, i in kwargs[1]:
                    kw[name] = inputs[i] if from_input else outs[i]
                fn(*args, **kw)
            else:
                fn(*args)
        for name, n in self.counts:
            _common.launch_counts[name] += n
        return _build(self.result, outs)


def _build(spec: Any, outs: list[torch.Tensor]) -> Any:
    kind = spec[0]
    if kind == "alloc":
        return outs[spec[1]]
    if kind == "view":
        _, i, size, stride, offset = spec
        return outs[i].as_strided(size, stride, offset)
    if kind == "seq":
        items = [_build(s, outs) for s in spec[2]]
        return items if spec[1] is list else tuple(items)
    return spec[1]  # "const"


def _make_plan(rec: _Recording, inputs: list[torch.Tensor], result: Any, counts, s) -> Plan:
    """The plan of a finished recording; raises ValueError when it is not replayable."""
    if rec.why is not None:
        raise ValueError(rec.why)
    if not rec.launches:
        raise ValueError("no kernel launch")
    storages = {}
    for t in inputs:
        st = t.untyped_storage().data_ptr()
        if st in storages and storages[st] != t.data_ptr():
            raise ValueError("inputs overlap in one storage")
        storages[st] = t.data_ptr()
    where: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for i, t in enumerate(inputs):
        where[t.data_ptr()].append((_IN, i))
    for i, t in enumerate(rec.allocs):
        if t.numel():
            where[t.data_ptr()].append((_OUT, i))

    def source(t: torch.Tensor) -> tuple[bool, int, torch.Tensor]:
        """``(from an input?, index, that input or allocation)`` of a kernel argument."""
        found = set(where.get(t.data_ptr(), ()))
        if t.numel() == 0 or len(found) != 1:
            raise ValueError("a kernel argument is not an input or an allocation")
        kind, i = next(iter(found))
        return kind == _IN, i, inputs[i] if kind == _IN else rec.allocs[i]

    launches = []
    for fn, args, kwargs in rec.launches:
        template, slots = [], []
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                from_input, i, base = source(a)
                slots.append((pos, from_input, i, None if a.dtype == base.dtype else a.dtype))
                template.append(None)
            else:
                template.append(a)
        consts, tensor_kw = {}, []
        for name, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                from_input, i, base = source(v)
                if v.dtype != base.dtype or v.shape != base.shape or v.stride() != base.stride():
                    raise ValueError(f"keyword {name} is a view")
                tensor_kw.append((name, from_input, i))
            else:
                consts[name] = v
        kw = (consts, tuple(tensor_kw)) if (consts or tensor_kw) else ()
        launches.append((fn, tuple(template), tuple(slots), kw))
    index = {id(t): i for i, t in enumerate(rec.allocs)}

    def spec(r: Any) -> Any:
        if isinstance(r, torch.Tensor):
            if id(r) in index:
                return ("alloc", index[id(r)])
            for i, t in enumerate(rec.allocs):
                if r.dtype == t.dtype and r.untyped_storage().data_ptr() == (
                    t.untyped_storage().data_ptr()
                ):
                    return ("view", i, tuple(r.shape), r.stride(), r.storage_offset())
            raise ValueError("a result is not an allocation")
        if isinstance(r, (list, tuple)):
            return ("seq", type(r), tuple(spec(x) for x in r))
        return ("const", r)

    allocs = tuple((tuple(t.shape), t.dtype, t.device) for t in rec.allocs)
    return Plan(allocs, tuple(launches), spec(result), counts, s)


def planned(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Serve repeated calls of a tile op's implementation from a recorded :class:`Plan`
    (see the module docstring).  ``name`` labels :data:`stats`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        plans: dict[tuple, Plan | None] = {}  # None: not replayable
        seen: set[tuple] = set()  # keys called once (the next call records)

        @functools.wraps(fn)
        def op(*args: Any, **kwargs: Any) -> Any:
            if kwargs or recording() is not None:
                return fn(*args, **kwargs)
            s = settings.current()
            inputs: list[torch.Tensor] = []
            try:
                # (the TF32 flag picks fp32 GEMMs' precision: a constant of the launch)
                key = (_common.meta_key(args, inputs), id(s), _common.tf32_allowed())
            except (TypeError, RuntimeError):  # symbolic sizes, no storage (fake/meta)
                return fn(*args)
            plan = plans.get(key, _MISSING)
            if plan is None:  # not replayable
                return fn(*args)
            if plan is not _MISSING and plan.settings is s:
                try:
                    out = plan.run(inputs)
                except Exception:  # let the implementation deal with it (and warn)
                    plans[key] = None
                    return fn(*args)
                stats[(name, "replayed")] += 1
                return out
            if plan is not _MISSING or key not in seen:  # first call (or stale settings)
                if len(seen) >= _LIMIT:
                    seen.clear()
                    plans.clear()
                seen.add(key)
                plans.pop(key, None)
                stats[(name, "plain")] += 1
                return fn(*args)
            return _record(name, fn, args, inputs, key, plans, s)

        op.plans = plans  # type: ignore[attr-defined]  (tests)
        return op

    return wrap


def _record(name, fn, args, inputs, key, plans, s) -> Any:
    if any(t.numel() == 0 for t in inputs):
        plans[key] = None
        stats[(name, "unplannable")] += 1
        why_not[name] = "an empty input"
        return fn(*args)
    rec = _Recording()
    _tls.rec = rec
    try:
        with _common.count_launches() as counts, rec:
            result = fn(*args)
    finally:
        _tls.rec = None
    try:
        plans[key] = _make_plan(rec, inputs, result, tuple(counts.items()), s)
        stats[(name, "recorded")] += 1
    except ValueError as e:
        plans[key] = None
        stats[(name, "unplannable")] += 1
        why_not[name] = str(e)
    return result
