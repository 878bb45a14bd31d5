"""Public API for custom kernel patterns.

.. code-block:: python

    @tilebackend.register_pattern(replacement=my_triton_swiglu, example_inputs=[("f", (4, 8))] * 2)
    def swiglu(a, b):
        return torch.nn.functional.silu(a) * b

A pattern is a *search* function in plain PyTorch and a *replacement* called with the same
arguments (by name).  The replacement may be a torch op, a callable made of torch ops, or
any Python callable (a Triton kernel launcher, a Helion kernel): the latter is wrapped in a
``torch.library.custom_op`` (``tile_user::<name>``) whose fake implementation runs the
search function on fake tensors, and whose backward is the search function's
(``torch.func.vjp``), so the graph stays traceable by AOTAutograd and Inductor and the
pattern applies in training too.  A ``torch.autograd.Function`` subclass keeps its own
backward.

Registration traces the search function and runs both functions on the example inputs
(every dtype in ``dtypes``): a search that does not trace, or a replacement whose outputs
differ in number, shape, dtype or value, is an error now rather than at compile time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import operator
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx

from .exc import DuplicatePatternError, PatternError, PatternValidationError
from .fx_passes import matcher
from .fx_passes.registry import REGISTRY, Pattern
from .fx_passes.verify import compare

__all__ = [
    "TensorSpec",
    "patterns",
    "register_pattern",
    "temporary_patterns",
    "unregister_pattern",
]

DEFAULT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_DTYPE_CODES = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i32": torch.int32,
    "i64": torch.int64,
    "bool": torch.bool,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An example input described by its shape and dtype.  ``dtype=None`` (or ``"f"``
    in the tuple form ``("f", shape)``) means the pattern dtype being traced."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str | None = None

    def make(self, dtype: torch.dtype) -> torch.Tensor:
        dt = self.dtype
        if dt is None or dt == "f":
            dt = dtype
        elif isinstance(dt, str):
            if dt not in _DTYPE_CODES:
                raise ValueError(f"unknown dtype code {dt!r} (use f, {', '.join(_DTYPE_CODES)})")
            dt = _DTYPE_CODES[dt]
        shape = tuple(int(s) for s in self.shape)
        if dt == torch.bool:
            return torch.rand(shape) > 0.5
        if dt.is_floating_point or dt.is_complex:
            return torch.randn(shape, dtype=dt)
        return torch.randint(0, 8, shape, dtype=dt)


def _example_fn(example_inputs: Any) -> Callable[[torch.dtype], tuple]:
    """``example_inputs`` in any accepted form, as ``dtype -> tuple of tensors``."""
    if callable(example_inputs) and not isinstance(example_inputs, (torch.Tensor, TensorSpec)):
        return example_inputs
    if isinstance(example_inputs, (torch.Tensor, TensorSpec)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (list, tuple)):
        raise TypeError(
            "example_inputs must be tensors, (kind, shape) specs, a list of them, or a "
            f"function of the dtype; got {type(example_inputs).__name__}"
        )
    items = list(example_inputs)

    def one(item: Any, dtype: torch.dtype) -> Any:
        if isinstance(item, torch.Tensor):
            item = item.detach()
            return item.to(dtype) if item.dtype.is_floating_point else item.clone()
        if isinstance(item, TensorSpec):
            return item.make(dtype)
        if (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], (str, torch.dtype))
        ):
            return TensorSpec(tuple(item[1]), item[0]).make(dtype)
        raise TypeError(
            f"example input {item!r} is not a tensor, a TensorSpec or a (dtype, shape) pair"
        )

    def make(dtype: torch.dtype) -> tuple:
        g = torch.Generator().manual_seed(0)
        state = torch.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        try:
            return tuple(one(i, dtype) for i in items)
        finally:
            torch.set_rng_state(state)

    return make


# --- wrapping a replacement into something the matcher can splice ---------------------

_ALLOWED = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
_used_op_names: set[str] = set()


def _is_op(fn: Any) -> bool:
    return isinstance(fn, _ALLOWED) or type(fn).__name__ == "CustomOpDef"


def _splices_as_ops(fn: Callable, tensor_params: list[str], scalars: dict[str, Any]) -> bool:
    """True when calling ``fn`` on graph proxies emits torch ops only (so it can be
    spliced as is, and Inductor still sees its ops)."""
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    kw: dict[str, Any] = {p: fx.Proxy(graph.placeholder(p), tracer) for p in tensor_params}
    kw.update(scalars)
    try:
        res = fn(**kw)
    except Exception:
        return False
    results = list(res) if isinstance(res, (list, tuple)) else [res]
    if not results or not all(isinstance(r, fx.Proxy) for r in results):
        return False

    def ok(t: Any) -> bool:
        if isinstance(t, torch._ops.OpOverloadPacket):  # spliced as .default: unambiguous only
            return t.overloads() == ["default"]
        return isinstance(t, torch._ops.OpOverload) or t is operator.getitem

    return all(ok(n.target) for n in graph.nodes if n.op == "call_function") and not any(
        n.op in ("call_method", "call_module") for n in graph.nodes
    )


def _schema_type(name: str, vals: Sequence[Any]) -> str:
    v = vals[0]
    if isinstance(v, bool):
        return "bool"
    if any(isinstance(x, float) for x in vals):
        return "float"
    if isinstance(v, int):
        return "int"
    if isinstance(v, (list, tuple)):
        flat = [x for val in vals for x in val]
        return "float[]" if any(isinstance(x, float) for x in flat) else "int[]"
    if isinstance(v, str):
        return "str"
    raise PatternError(
        name=name, reason=f"scalar example value {v!r} has no torch.library schema type"
    )


def _op_name(name: str) -> str:
    base = re.sub(r"\W", "_", name)
    if not base or base[0].isdigit():
        base = "p_" + base
    for i in itertools.count():
        cand = base if i == 0 else f"{base}_{i}"
        if cand not in _used_op_names and not hasattr(torch.ops.tile_user, cand):
            _used_op_names.add(cand)
            return cand
    raise AssertionError  # pragma: no cover


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def _wrap_custom_op(
    name: str,
    search: Callable,
    replacement: Any,
    params: list[str],
    tensor_params: list[str],
    scalars: dict[str, tuple[Any, Any]],
    n_out: int,
) -> Callable[..., Any]:
    """``replacement`` as ``tile_user::<name>``: fake impl = the search function on fake
    tensors, backward = the search function's vjp (or an autograd.Function's own)."""
    opname = _op_name(name)
    qual = f"tile_user::{opname}"
    args_schema = ", ".join(
        f"Tensor {p}" if p in tensor_params else f"{_schema_type(name, scalars[p])} {p}"
        for p in params
    )
    outs = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
    schema = f"({args_schema}) -> {outs}"
    is_function = inspect.isclass(replacement) and issubclass(replacement, torch.autograd.Function)

    def kwargs_of(args: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(params, args))

    def impl(*args):
        kw = kwargs_of(args)
        ins = [kw[p] for p in tensor_params]
        with torch.no_grad():
            res = replacement.apply(*args) if is_function else replacement(**kw)
        res = _as_tuple(res)
        if len(res) != n_out:
            raise PatternError(
                name=name, reason=f"replacement returned {len(res)} value(s), expected {n_out}"
            )
        fixed = []
        for r in res:
            if not isinstance(r, torch.Tensor):
                raise PatternError(name=name, reason=f"replacement returned {type(r).__name__}")
            if any(r is i or _same_storage(r, i) for i in ins):
                r = r.clone()  # a custom op may not return an alias of an input
            fixed.append(r.contiguous())
        return fixed[0] if n_out == 1 else tuple(fixed)

    def fake(*args):
        res = _as_tuple(search(**kwargs_of(args)))
        outs_ = [r.new_empty(r.shape) for r in res]  # contiguous, as impl returns
        return outs_[0] if n_out == 1 else tuple(outs_)

    op = torch.library.custom_op(qual, impl, mutates_args=(), schema=schema)
    op.register_fake(fake)

    def setup_context(ctx, inputs, output):
        ctx.args = list(inputs)
        ctx.tensor_idx = [i for i, p in enumerate(params) if p in tensor_params]
        ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_idx])
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in _as_tuple(output)]

    if is_function:
        bwd_op = _function_backward_op(
            qual + "_backward", replacement, params, tensor_params, scalars, name
        )

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_idx, saved):
            args[i] = t
        if is_function:
            gins = bwd_op(_fill(grads, ctx.out_meta), *args)
        else:

            def f(*ts):
                a = list(args)
                for i, t in zip(ctx.tensor_idx, ts):
                    a[i] = t
                return _as_tuple(search(**kwargs_of(a)))

            # only floating inputs have gradients (an index or a mask has none)
            diff = [j for j, t in enumerate(saved) if t.is_floating_point() or t.is_complex()]

            def f_diff(*ts):
                full = list(saved)
                for j, t in zip(diff, ts):
                    full[j] = t
                return f(*full)

            _, vjp = torch.func.vjp(f_diff, *[saved[j] for j in diff])
            gins = [None] * len(saved)
            for j, g in zip(diff, vjp(tuple(_fill(grads, ctx.out_meta)))):
                gins[j] = g
        out: list[Any] = [None] * len(params)
        for i, g in zip(ctx.tensor_idx, gins):
            out[i] = g
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
    packet = getattr(torch.ops.tile_user, opname)

    def splice(**kw):
        res = packet.default(*[kw[p] for p in params])
        # (traced, a multi-output op gives one proxy: its outputs are getitems of it)
        return res if n_out == 1 else tuple(res[i] for i in range(n_out))

    splice.__name__ = f"tile_user_{opname}"
    splice.op = packet.default  # type: ignore[attr-defined]
    return splice


def _fill(grads: Sequence[Any], meta) -> list[torch.Tensor]:
    return [
        g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
        for g, (shape, dt, dev) in zip(grads, meta)
    ]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() > 0
    except Exception:
        return False


class _Ctx:
    """A stand-in ``ctx`` for re-running an autograd.Function's forward and backward."""

    def __init__(self, needs: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs
        self.saved_tensors: tuple = ()
        self.materialize_grads = True

    def save_for_backward(self, *ts):
        self.saved_tensors = ts

    def mark_non_differentiable(self, *_):
        pass

    def mark_dirty(self, *_):
        pass

    def set_materialize_grads(self, v):
        self.materialize_grads = v


def _function_backward_op(qual, fn_cls, params, tensor_params, scalars, name):
    """``tile_user::<name>_backward``: recomputes ``fn_cls.forward`` (to fill its ctx)
    and returns ``fn_cls.backward``'s grads for the tensor inputs (zeros for None)."""
    args_schema = ", ".join(
        f"Tensor {p}" if p in tensor_params else f"{_schema_type(name, scalars[p])} {p}"
        for p in params
    )
    tidx = [i for i, p in enumerate(params) if p in tensor_params]

    def impl(grads, *args):
        ctx = _Ctx(tuple(p in tensor_params for p in params))
        with torch.no_grad():
            fn_cls.forward(ctx, *args)
            gins = _as_tuple(fn_cls.backward(ctx, *grads))
        return [
            (
                gins[i].contiguous()
                if i < len(gins) and gins[i] is not None
                else torch.zeros_like(args[i])
            )
            for i in tidx
        ]

    def fake(grads, *args):
        return [args[i].new_empty(args[i].shape) for i in tidx]

    op = torch.library.custom_op(
        qual, impl, mutates_args=(), schema=f"(Tensor[] grads, {args_schema}) -> Tensor[]"
    )
    op.register_fake(fake)
    return op


# --- registration ---------------------------------------------------------------------


def _origin(depth: int) -> str:
    try:
        f = sys._getframe(depth)
    except ValueError:
        return "?"
    return f"{f.f_code.co_filename}:{f.f_lineno}"


def register_pattern(
    search: Callable | None = None,
    *,
    replacement: Any,
    example_inputs: Any,
    name: str | None = None,
    priority: int = 0,
    check: Callable[..., Any] | None = None,
    scalars: dict[str, tuple[Any, Any]] | None = None,
    dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
    validate: bool = True,
) -> Any:
    """Register a custom kernel pattern (as a function or a decorator on ``search``).

    ``search``: plain PyTorch; its tensor parameters get ``example_inputs`` and the rest
    are ``scalars`` (``{"name": (example1, example2)}``, two distinct values: they become
    wildcards matched against any constant).  ``replacement``: called with the same
    arguments by name; a torch op, a function of torch ops, a Triton launcher, a Helion
    kernel or a ``torch.autograd.Function`` subclass.  ``example_inputs``: tensors, a
    ``dtype -> tuple`` callable, or ``[("f", (4, 8)), TensorSpec((8,), "f32"), ...]``
    (``"f"`` = the dtype being traced).  ``check(**inputs, **scalars)`` sees fake tensors
    and returns None or True (anything truthy) to accept, False (anything falsy) or a
    reason string to refuse; under dynamic shapes its sizes are symbolic, and what it
    decides about them becomes a shape guard.  Higher ``priority`` wins where
    patterns overlap.  ``name`` defaults to the search function's name.

    As a function it returns the registered :class:`Pattern`; as a decorator it returns
    the search function unchanged.  Errors (``tilebackend.exc``) are raised here.
    """
    origin = _origin(2)
    if search is None:

        def deco(fn: Callable) -> Callable:
            _register(fn, replacement, example_inputs, name, priority, check, scalars,
                      dtypes, validate, origin)  # fmt: skip
            return fn

        return deco
    return _register(
        search, replacement, example_inputs, name, priority, check, scalars, dtypes,
        validate, origin,
    )  # fmt: skip


def _register(
    search, replacement, example_inputs, name, priority, check, scalars, dtypes, validate, origin
) -> Pattern:
    name = name or getattr(search, "__name__", None)
    if not name or name == "<lambda>":
        raise PatternError(name=name, reason="give a name= (the search function has none)")
    REGISTRY.ensure_builtins()
    if name in REGISTRY._patterns:
        raise DuplicatePatternError(name=name, first=REGISTRY._patterns[name].origin, second=origin)
    if not callable(search) or isinstance(search, torch._ops.OpOverload):
        raise PatternError(name=name, reason="search must be a plain PyTorch function")
    if not (callable(replacement) or _is_op(replacement)):
        raise PatternError(name=name, reason="replacement must be callable")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise PatternError(name=name, reason=f"priority must be an int, got {priority!r}")
    scalars = dict(scalars or {})
    dtypes = tuple(dtypes)
    if not dtypes or not all(isinstance(d, torch.dtype) for d in dtypes):
        raise PatternError(name=name, reason=f"dtypes must be torch dtypes, got {dtypes!r}")
    try:
        params = list(inspect.signature(search).parameters)
    except (TypeError, ValueError) as e:
        raise PatternError(name=name, reason=f"search has no inspectable signature: {e}") from e
    tensor_params = [p for p in params if p not in scalars]
    try:
        examples = _example_fn(example_inputs)
    except TypeError as e:
        raise PatternError(name=name, reason=str(e)) from e

    probe = Pattern(
        name=name, search=search, replacement=replacement, check=check,
        example_inputs=examples, scalars=scalars, dtypes=dtypes, priority=priority,
        origin=origin,
    )  # fmt: skip
    from .fx_passes.registry import _validate

    _validate(probe)  # scalars are parameters, two distinct values each, ...
    # the search function must trace (to ATen, as models are traced) for every dtype
    try:
        outs = _as_tuple(_eager(search, examples(dtypes[0]), tensor_params, scalars))
    except PatternError:
        raise
    except Exception as e:
        raise PatternError(
            name=name, reason=f"search function does not run: {type(e).__name__}: {e}"
        ) from e
    n_out = len(outs)
    for traced in matcher.variants(probe, "eager"):
        _check_traced(name, traced, n_out)
    first_scalars = {k: v[0] for k, v in scalars.items()}

    if _is_op(replacement):
        op = replacement

        def splice(**kw):
            return op(*[kw[p] for p in params])

        spliced: Callable = splice
    elif not (
        inspect.isclass(replacement) and issubclass(replacement, torch.autograd.Function)
    ) and _splices_as_ops(replacement, tensor_params, first_scalars):
        spliced = replacement
    else:
        spliced = _wrap_custom_op(name, search, replacement, params, tensor_params, scalars, n_out)
    pattern = probe  # keeps the traces made above (they are cached per pattern)
    pattern.replacement = spliced
    pattern.user_replacement = replacement  # type: ignore[attr-defined]
    if validate:
        for dt in dtypes:
            args = examples(dt)
            ref = _eager(search, args, tensor_params, scalars)
            mutated: list[str] = []
            try:
                got = _eager(spliced, args, tensor_params, scalars, mutated)
            except Exception as e:
                raise PatternValidationError(
                    name=name, dtype=dt, reason=f"replacement raised {type(e).__name__}: {e}"
                ) from e
            if mutated:  # (a graph's other readers of that input would see the change)
                raise PatternValidationError(
                    name=name,
                    dtype=dt,
                    reason=f"replacement changes its input(s) {', '.join(mutated)} in place",
                )
            why = compare(_as_tuple(got), _as_tuple(ref))
            if why is not None:
                raise PatternValidationError(name=name, dtype=dt, reason=why)
    REGISTRY.add(pattern)
    return pattern


def _check_traced(name: str, traced: Any, n_out: int) -> None:
    """A search function a model's graph can match: it reads tensor inputs, every one of
    them (a match binds each parameter to a graph node), and mutates none (traced, an
    in-place op on an input becomes an extra output, or stays a mutating op)."""
    if not traced.placeholders:
        raise PatternError(name=name, reason="the search function reads no tensor input")
    unused = [p for p, ph in zip(traced.params, traced.placeholders) if not ph.users]
    if unused:
        raise PatternError(
            name=name, reason=f"the search function does not use its input(s) {', '.join(unused)}"
        )
    reached, todo = set(), [traced.anchor]  # what matching from the anchor walks
    while todo:
        n = todo.pop()
        if n not in reached:
            reached.add(n)
            todo.extend(n.all_input_nodes)
    for i, o in enumerate(traced.outputs):
        src = o.args[0] if o.target is operator.getitem else o
        if src not in reached:
            raise PatternError(
                name=name,
                reason=f"output {i} ({o.target}) is not computed on the way to output 0 "
                f"({traced.anchor.target}): a match starts at the first output and walks "
                "back through its inputs, so every other output must be one of the values "
                "it is computed from",
            )
    from .fx_passes.cse import op_mutates

    mutating = [
        n.target for n in traced.graph.nodes if n.op == "call_function" and op_mutates(n.target)
    ]
    if len(traced.outputs) != n_out or mutating:
        what = f" ({mutating[0]})" if mutating else ""
        raise PatternError(
            name=name,
            reason=f"the search function mutates a tensor in place{what}: "
            "a pattern must be functional",
        )


def _eager(
    fn: Callable, args: Sequence[Any], tensor_params, scalars, mutated: list | None = None
) -> Any:
    """``fn`` on clones of ``args``; the names of the inputs it changed go to ``mutated``."""
    clones = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    kw = dict(zip(tensor_params, clones))
    kw.update({k: v[0] for k, v in scalars.items()})
    with torch.no_grad():
        out = fn(**kw)
    if mutated is not None:
        mutated.extend(
            p
            for p, a, c in zip(tensor_params, args, clones)
            if isinstance(a, torch.Tensor) and not _unchanged(a, c)
        )
    return out


def _unchanged(a: torch.Tensor, c: torch.Tensor) -> bool:
    if a.is_floating_point():
        a, c = a.nan_to_num(), c.nan_to_num()
    return torch.equal(a, c)


def unregister_pattern(name: str) -> Pattern:
    """Remove a registered pattern (KeyError naming the registered ones if unknown)."""
    REGISTRY.ensure_builtins()
    try:
        p = REGISTRY.remove(name)
    except KeyError:
        raise KeyError(
            f"no pattern named {name!r} is registered; registered: {', '.join(REGISTRY.names())}"
        ) from None
    REGISTRY.warn_if_used(p)
    return p


def patterns() -> list[str]:
    """Names of the registered patterns (built-ins included), in registration order."""
    return REGISTRY.names()


@contextlib.contextmanager
def temporary_patterns() -> Iterator[None]:
    """Patterns registered inside the block are unregistered when it exits."""
    REGISTRY.ensure_builtins()
    before = set(REGISTRY.names())
    try:
        yield
    finally:
        for n in REGISTRY.names():
            if n not in before:
                REGISTRY.warn_if_used(REGISTRY.remove(n))
