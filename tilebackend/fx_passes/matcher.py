"""Trace search functions to ATen, match them on ATen graphs, splice in replacements."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from ..exc import PatternError
from .registry import Pattern

_WILD = object()


@dataclasses.dataclass
class Wildcard:
    name: str


@dataclasses.dataclass
class TracedPattern:
    """One traced variant (per dtype and decomposition table) of a traced pattern."""

    graph: fx.Graph
    params: list[str]  # search-function tensor parameter names, placeholder order
    placeholders: list[fx.Node]
    outputs: list[fx.Node]
    anchor: fx.Node
    #: the input dtypes (placeholder order) of every traced variant this one stands for
    #: (variants with the same graph are kept once)
    input_dtypes: list[tuple] = dataclasses.field(default_factory=list)

    def signature(self) -> str:
        return str(self.graph)

    def placeholder_dtypes(self) -> tuple:
        return tuple(_dtype_of(ph) for ph in self.placeholders)


def _dtype_of(n: Any) -> torch.dtype | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


@dataclasses.dataclass
class Match:
    pattern: Pattern
    anchor: fx.Node
    nodes: list[fx.Node]  # every matched compute node
    outputs: list[fx.Node | None]  # graph nodes standing for the pattern outputs
    inputs: dict[str, Any]  # search parameter -> graph node (or literal)
    scalars: dict[str, Any]

    def values(self) -> dict[str, Any]:
        """Inputs as their fake values (meta['val']) plus scalars: what ``check`` sees."""
        out = {k: _val(v) for k, v in self.inputs.items()}
        out.update(self.scalars)
        return out


def _val(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return v.meta.get("val", v.meta.get("example_value"))
    if isinstance(v, (list, tuple)):
        return type(v)(_val(x) for x in v)
    return v


# --- tracing ------------------------------------------------------------------------


def _trace(fn, args, table) -> fx.GraphModule:
    """Trace ``fn`` to ATen exactly as AOTAutograd lowers model graphs (functionalized,
    same decompositions), on fake copies of ``args``."""
    captured: list[fx.GraphModule] = []

    def capture(gm, _inputs):
        captured.append(gm)
        return gm.forward

    with _compat.isolated_tracing():
        compiled = _compat.aot_function(fn, fw_compiler=capture, decompositions=table or {})
        mode = _compat.fake_tensor_mode()
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode:
            compiled(*fakes)
    return captured[0]


def _literal_diff(pa: Any, pb: Any, name: str, pattern: Pattern, path: str) -> Any:
    """Walk two traced args; positions whose literals differ become Wildcard(name)."""
    if isinstance(pa, fx.Node) or isinstance(pb, fx.Node):
        if not (isinstance(pa, fx.Node) and isinstance(pb, fx.Node)):
            raise PatternError(
                name=pattern.name, reason=f"graph structure depends on scalar {name!r} at {path}"
            )
        return pa
    if isinstance(pa, (list, tuple)) and isinstance(pb, (list, tuple)) and len(pa) == len(pb):
        diffs = [
            _literal_diff(a, b, name, pattern, f"{path}[{i}]")
            for i, (a, b) in enumerate(zip(pa, pb))
        ]
        if len(pa) == 1 and isinstance(diffs[0], Wildcard):
            return Wildcard(name)  # [dim] -> the dim itself; bound value is unwrapped
        return type(pa)(diffs)
    if isinstance(pa, Wildcard):
        return pa
    if type(pa) is type(pb) and pa == pb:
        return pa
    return Wildcard(name)


def trace_pattern(pattern: Pattern, dtype: torch.dtype, table: dict | None) -> TracedPattern:
    import inspect

    params = list(inspect.signature(pattern.search).parameters)
    tensor_params = [p for p in params if p not in pattern.scalars]
    try:
        args = list(pattern.example_inputs(dtype))
    except Exception as e:
        raise PatternError(name=pattern.name, reason=f"example_inputs({dtype}) raised {e!r}") from e
    if len(args) != len(tensor_params):
        raise PatternError(
            name=pattern.name,
            reason=f"example_inputs gave {len(args)} values for parameters {tensor_params}",
        )

    def bind(scal):
        def fn(*tensors):
            kw = dict(zip(tensor_params, tensors))
            kw.update(scal)
            return pattern.search(**kw)

        return fn

    base = {k: v[0] for k, v in pattern.scalars.items()}
    try:
        gm = _trace(bind(base), args, table)
    except Exception as e:
        raise PatternError(
            name=pattern.name, reason=f"search function does not trace: {type(e).__name__}: {e}"
        ) from e
    graph = gm.graph
    for sname, (_, v1) in pattern.scalars.items():
        other = _trace(bind({**base, sname: v1}), args, table).graph
        na, nb = list(graph.nodes), list(other.nodes)
        if len(na) != len(nb) or any(a.target != b.target for a, b in zip(na, nb)):
            raise PatternError(
                name=pattern.name, reason=f"graph structure depends on scalar {sname!r}"
            )
        for a, b in zip(na, nb):
            if a.op == "call_function":
                a.args = _literal_diff(a.args, b.args, sname, pattern, f"{a.name}.args")
                a.kwargs = _literal_diff(a.kwargs, b.kwargs, sname, pattern, f"{a.name}.kwargs")
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    if not outs or not all(isinstance(o, fx.Node) and o.op == "call_function" for o in outs):
        raise PatternError(name=pattern.name, reason="search must return tensors computed by ops")
    anchor = outs[0]
    while anchor.target is operator.getitem:
        anchor = anchor.args[0]
    return TracedPattern(graph, tensor_params, phs, outs, anchor)


@functools.cache
def _variants_cached(pattern: Pattern, table_key: str) -> tuple[TracedPattern, ...]:
    from ..backend import decomposition_table

    table = decomposition_table(table_key)
    seen: dict[str, TracedPattern] = {}
    for dt in pattern.dtypes:
        # (example inputs are made, keyed and traced outside the graph's fake mode: under
        # Inductor's, a user's example function drawing a seed could not run)
        with _compat.isolated_tracing():
            tp = _traced(pattern, dt, table_key, table)
        kept = seen.setdefault(tp.signature(), tp)
        if tp.placeholder_dtypes() not in kept.input_dtypes:
            kept.input_dtypes.append(tp.placeholder_dtypes())
    return tuple(seen.values())


def _traced(pattern: Pattern, dtype: torch.dtype, table_key: str, table) -> TracedPattern:
    """One traced variant: from the on-disk pattern cache, else traced (and stored)."""
    from . import pattern_cache

    key = pattern_cache.key(pattern, dtype, table_key, table) if pattern_cache.enabled() else None
    tp = pattern_cache.load(key) if key else None
    if tp is None:
        tp = trace_pattern(pattern, dtype, table)
        if key:
            pattern_cache.store(key, tp)
    return tp


def variants(pattern: Pattern, table_key: str) -> tuple[TracedPattern, ...]:
    return _variants_cached(pattern, table_key)


# --- matching -----------------------------------------------------------------------

_aten = torch.ops.aten
#: ops whose argument at this index is a dim (or dim list) relative to args[0]'s rank
_DIM_ARG = {
    _aten.mean.dim: 1,
    _aten.sum.dim_IntList: 1,
    _aten.amax.default: 1,
    _aten.amin.default: 1,
    _aten.var.correction: 1,
    _aten.var_mean.correction: 1,
    _aten._softmax.default: 1,
    _aten._log_softmax.default: 1,
}


def _canon_dims(node: fx.Node) -> tuple:
    """node.args with a reduction dim written as a negative dim, so a pattern traced at
    rank 2 matches the same reduction at any rank."""
    args = node.args
    idx = _DIM_ARG.get(node.target)
    if idx is None or len(args) <= idx or not args or not isinstance(args[0], fx.Node):
        return args
    val = args[0].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return args
    nd = val.dim()

    def canon(d):
        if isinstance(d, bool) or not isinstance(d, int):
            return d
        return d - nd if d >= 0 else d

    d = args[idx]
    d = type(d)(canon(x) for x in d) if isinstance(d, (list, tuple)) else canon(d)
    return (*args[:idx], d, *args[idx + 1 :])


class _NoMatch(Exception):
    pass


def _norm_target(t: Any) -> Any:
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.default
    return t


def match_traced(tp: TracedPattern, pattern: Pattern, node: fx.Node) -> Match | str:
    """Match ``tp`` with its anchor at ``node``: a Match, or why not (a string)."""
    pmap: dict[fx.Node, fx.Node] = {}
    binds: dict[str, Any] = {}
    scalars: dict[str, Any] = {}

    def m_arg(pa: Any, ga: Any) -> None:
        if isinstance(pa, Wildcard):
            val = ga
            if isinstance(val, (list, tuple)) and len(val) == 1:
                val = val[0]
            if isinstance(val, fx.Node):
                raise _NoMatch(
                    f"scalar {pa.name!r} is a graph value here, not a constant (under "
                    "dynamic=True a function's float argument is one: a literal or a "
                    "module attribute stays constant)"
                )
            if pa.name in scalars and scalars[pa.name] != val:
                raise _NoMatch(f"scalar {pa.name!r} takes two values ({scalars[pa.name]}, {val})")
            scalars[pa.name] = val
        elif isinstance(pa, fx.Node):
            if not isinstance(ga, fx.Node):
                if pa.op == "placeholder":  # a tensor parameter bound to a constant
                    return bind_ph(pa, ga)
                raise _NoMatch(f"expected a computed value, found constant {ga!r}")
            m_node(pa, ga)
        elif isinstance(pa, (list, tuple)):
            if not isinstance(ga, (list, tuple)) or len(pa) != len(ga):
                raise _NoMatch(f"argument {ga!r} differs from {pa!r}")
            for a, b in zip(pa, ga):
                m_arg(a, b)
        elif isinstance(pa, dict):
            if not isinstance(ga, dict) or set(pa) != set(ga):
                raise _NoMatch("keyword arguments differ")
            for k in pa:
                m_arg(pa[k], ga[k])
        elif isinstance(pa, (torch.device, torch.layout)):
            if type(ga) is not type(pa):  # the device a pattern was traced on is not a constraint
                raise _NoMatch(f"constant {ga!r} differs from the pattern's {pa!r}")
        else:
            if isinstance(ga, fx.Node) or type(pa) is not type(ga) or pa != ga:
                raise _NoMatch(f"constant {ga!r} differs from the pattern's {pa!r}")

    def bind_ph(pa: fx.Node, ga: Any) -> None:
        name = tp.params[tp.placeholders.index(pa)]
        if name in binds and binds[name] is not ga:
            raise _NoMatch(f"input {name!r} would bind two different values")
        binds[name] = ga

    def m_node(pn: fx.Node, gn: fx.Node) -> None:
        if pn in pmap:
            if pmap[pn] is not gn:
                raise _NoMatch(f"pattern node {pn.name} would match two graph nodes")
            return
        if pn.op == "placeholder":
            bind_ph(pn, gn)
            pmap[pn] = gn
            return
        if gn.op != "call_function" or _norm_target(gn.target) != _norm_target(pn.target):
            raise _NoMatch(f"{gn.name} is {gn.target}, pattern expects {pn.target}")
        pmap[pn] = gn
        m_arg(_canon_dims(pn), _canon_dims(gn))
        m_arg(pn.kwargs, gn.kwargs)

    try:
        m_node(tp.anchor, node)
        outputs: list[fx.Node | None] = []
        for po in tp.outputs:
            if po in pmap:
                outputs.append(pmap[po])
            elif po.target is operator.getitem and po.args[0] in pmap:
                src, idx = pmap[po.args[0]], po.args[1]
                hits = [u for u in src.users if u.target is operator.getitem and u.args[1] == idx]
                outputs.append(hits[0] if hits else None)
                if hits:
                    pmap[po] = hits[0]
            else:
                raise _NoMatch(f"pattern output {po.name} not reached from the anchor")
    except _NoMatch as e:
        return str(e)
    if not pattern.builtin and tp.input_dtypes:  # (built-ins' checks rule on dtypes)
        why = _dtype_mismatch(tp, [binds.get(p) for p in tp.params])
        if why is not None:
            return why
    matched = [g for p, g in pmap.items() if p.op != "placeholder"]
    matched_set = set(matched)
    out_set = {o for o in outputs if o is not None}
    for g in matched:
        if g in out_set:
            continue
        for u in g.users:
            if u not in matched_set:
                return f"intermediate {g.name} ({g.target}) is also used by {u.name} outside the pattern"
    return Match(pattern, node, matched, outputs, binds, scalars)


def _dtype_mismatch(tp: TracedPattern, bound: list) -> str | None:
    """Why inputs of these dtypes are not a user pattern's: its replacement was checked
    against the search function for the dtypes it was traced with, and only those."""
    have = tuple(_dtype_of(b) for b in bound)

    def fits(want: tuple) -> bool:
        return all(h is None or w is None or h == w for h, w in zip(have, want))

    if any(fits(w) for w in tp.input_dtypes):
        return None

    def names(dts: tuple) -> str:
        return ", ".join(str(d).removeprefix("torch.") if d else "-" for d in dts)

    traced = "; ".join(f"({names(w)})" for w in tp.input_dtypes)
    return f"dtypes: inputs ({', '.join(tp.params)}) are ({names(have)}); traced for {traced}"


def match_op(pattern: Pattern, node: fx.Node) -> Match | str:
    op = pattern.search
    if node.op != "call_function" or node.target != op:
        return f"{node.target} is not {op}"
    try:
        bound = _bind_schema(op, node.args, node.kwargs)
    except Exception as e:
        return f"arguments do not fit {op}'s schema: {e}"
    inputs = {k: v for k, v in bound.items() if _has_node(v)}
    scalars = {k: v for k, v in bound.items() if not _has_node(v)}
    return Match(pattern, node, [node], [node], inputs, scalars)


def _has_node(v: Any) -> bool:
    if isinstance(v, fx.Node):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_node(x) for x in v)
    return False


def _bind_schema(op: torch._ops.OpOverload, args, kwargs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    schema_args = op._schema.arguments
    for i, a in enumerate(schema_args):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            raise TypeError(f"missing argument {a.name}")
    return out


# --- replacing ----------------------------------------------------------------------


def _fake_mode_of(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def _set_meta(node: fx.Node, fake_mode) -> None:
    """Compute meta['val'] of a new node by running its target on fake values."""
    args = torch.fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
    if fake_mode is None:
        return
    with fake_mode, _compat.python_dispatcher():
        node.meta["val"] = node.target(*args, **kwargs)


def apply(gm: fx.GraphModule, match: Match) -> list[fx.Node]:
    """Splice the replacement in for ``match``; return the new nodes."""
    graph = gm.graph
    pattern = match.pattern
    fake_mode = _fake_mode_of(gm)
    before = set(graph.nodes)
    try:
        new_nodes, outputs = (_splice_op if pattern.is_op_pattern else _splice)(
            gm, match, fake_mode, before
        )
    except BaseException:
        # leave the graph as it was: until the swap below the new nodes are used only by
        # each other, so all of them can go (a pattern that fails costs only its match)
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        raise
    for old, r in zip(match.outputs, outputs):
        if old is not None:
            old.replace_all_uses_with(r)
    for n in sorted(match.nodes, key=_topo_index(graph), reverse=True):
        if not n.users:
            graph.erase_node(n)
    return new_nodes


def _splice_op(gm: fx.GraphModule, match: Match, fake_mode, before: set):
    node = match.anchor
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(match.pattern.replacement, node.args, node.kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    _set_meta(new, fake_mode)
    return [new], [new]


def _splice(gm: fx.GraphModule, match: Match, fake_mode, before: set):
    """The replacement's nodes, inserted and typed but not yet used, and its outputs."""
    graph = gm.graph
    pattern = match.pattern
    tracer = fx.proxy.GraphAppendingTracer(graph)
    proxies = {
        k: fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v for k, v in match.inputs.items()
    }
    scal = dict(match.scalars)
    derived = pattern.derive(**match.values()) if pattern.derive is not None else {}
    input_nodes = [n for v in match.inputs.values() for n in _nodes_in(v)]
    table = _size_table(graph, input_nodes) if derived else {}
    sources = {k: _size_sources(pattern, v, table) for k, v in derived.items()}
    order = _topo_index(graph)
    first = min(match.nodes, key=order)
    if any(order(n) > order(first) for n in input_nodes):
        first = match.anchor  # an input is computed between matched nodes
    with graph.inserting_before(first):
        scal.update({k: _write_sizes(graph, tracer, v) for k, v in sources.items()})
        res = pattern.replacement(**proxies, **scal)
    results = list(res) if isinstance(res, (list, tuple)) else [res]
    if len(results) != len(match.outputs):
        raise PatternError(
            name=pattern.name,
            reason=f"replacement returned {len(results)} values for {len(match.outputs)} outputs",
        )
    new_nodes = [n for n in graph.nodes if n not in before]
    for n in new_nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverloadPacket):
            n.target = n.target.default
        if not (isinstance(n.target, torch._ops.OpOverload) or n.target is operator.getitem):
            raise PatternError(
                name=pattern.name, reason=f"replacement must call torch ops only, got {n.target}"
            )
        trace = match.anchor.meta.get("stack_trace")
        if trace is not None:  # code with no source file (exec'd) has none: set no None
            n.meta["stack_trace"] = trace
        _set_meta(n, fake_mode)
    outputs = [r.node if isinstance(r, fx.Proxy) else r for r in results]
    bad = [
        type(r).__name__
        for r, old in zip(outputs, match.outputs)
        if old is not None and not isinstance(r, fx.Node)
    ]
    if bad:
        raise PatternError(
            name=pattern.name, reason=f"replacement returned {bad[0]}, not a traced tensor"
        )
    return new_nodes, outputs


@dataclasses.dataclass(frozen=True)
class _SizeOf:
    """A symbolic size to be read from the graph: dim ``dim`` of tensor node ``node``."""

    node: fx.Node
    dim: int


def _size_table(graph: fx.Graph, input_nodes: list[fx.Node]) -> dict[Any, Any]:
    """Where the graph holds each symbolic size (by sympy expression): a node whose value
    is that size (a graph input ``Sym(s0)``), else a dim of a tensor, read with
    ``aten.sym_size``.  Graph inputs come first: a size read from them stays valid
    wherever a later pass moves or replaces the matched inputs (say, an add that the
    residual-norm fusion takes into the norm)."""
    nodes = [n for n in graph.nodes if n.op == "placeholder"] + input_nodes
    table: dict[Any, Any] = {}
    for n in nodes:
        if isinstance(val := n.meta.get("val"), torch.SymInt):
            table.setdefault(val.node.expr, n)
    for n in nodes:
        if isinstance(val := n.meta.get("val"), torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt):
                    table.setdefault(s.node.expr, _SizeOf(n, d))
    return table


def _size_sources(pattern: Pattern, v: Any, table: dict[Any, Any]) -> Any:
    """``v`` (a value ``derive`` returned) with each symbolic size (a SymInt with free
    symbols) replaced by where ``table`` says the graph holds it.

    A derived value may be computed from the matched values' symbolic sizes, say
    ``list(x.shape[-1:])``: the replacement must read such a size from the graph, never
    bake in the size at the hint (which would be wrong for every other size).  The
    lookup compares sympy expressions: it adds no guard."""
    from .shapes import is_symbolic

    if isinstance(v, (list, tuple)):
        return type(v)(_size_sources(pattern, x, table) for x in v)
    if not isinstance(v, torch.SymInt):
        return v
    if not is_symbolic(v):
        return int(v.node.expr)
    if (src := table.get(v.node.expr)) is None:
        raise PatternError(
            name=pattern.name,
            reason=f"derive returned the symbolic size {v}, which the graph holds nowhere",
        )
    return src


def _write_sizes(graph: fx.Graph, tracer, v: Any) -> Any:
    """``v`` with each size source as a proxy: a node as it is, a :class:`_SizeOf` as a
    new ``aten.sym_size.int`` node."""
    if isinstance(v, (list, tuple)):
        return type(v)(_write_sizes(graph, tracer, x) for x in v)
    if isinstance(v, _SizeOf):
        return fx.Proxy(graph.call_function(_aten.sym_size.int, (v.node, v.dim)), tracer)
    if isinstance(v, fx.Node):
        return fx.Proxy(v, tracer)
    return v


def _nodes_in(v: Any) -> list[fx.Node]:
    if isinstance(v, fx.Node):
        return [v]
    if isinstance(v, (list, tuple)):
        return [n for x in v for n in _nodes_in(x)]
    return []


def _topo_index(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order.get(n, -1)
