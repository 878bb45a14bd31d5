"""ATen FX graphs to and from plain JSON data, node by node.

For the stored pre-autograd graphs (``compile_cache.GraphStore``).  FX's own pickle of a
``GraphModule`` rebuilds it by re-running its code under ``symbolic_trace``, which runs
every call whose arguments are all constants: a ``randn([4, 4])`` would come back as a
frozen constant tensor, the same numbers on every call.  Here each node is written as
it is (op, target, arguments) and rebuilt with ``Graph.create_node``; nothing runs and
nothing is imported on load: targets resolve only to ``torch.ops`` overloads and a
short list of Python and ``torch.sym_*`` functions.

Graphs with attributes or submodules (``get_attr``, ``call_module``), method calls, or
argument values outside the table below are not serializable (:class:`Unserializable`).
"""

from __future__ import annotations

import math
import operator
import types
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Unserializable", "dump", "load"]

_NODE_OPS = ("placeholder", "call_function", "output")
#: plain functions a graph may call, by the name they are written under
_FUNCTIONS: dict[str, Any] = {
    **{
        f"operator.{n}": getattr(operator, n)
        for n in dir(operator)
        if not n.startswith("_") and isinstance(getattr(operator, n), types.BuiltinFunctionType)
    },
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "sqrt", "trunc")},
    **{
        f"torch.{n}": getattr(torch, n)
        for n in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "_sym_sqrt")
        if hasattr(torch, n)
    },
}
_NAMES = {id(fn): name for name, fn in _FUNCTIONS.items()}
_ENUMS = {
    "dtype": torch.dtype,
    "layout": torch.layout,
    "memory_format": torch.memory_format,
}


class Unserializable(ValueError):
    """The graph holds something this format does not describe."""


def dump(gm: fx.GraphModule) -> dict:
    """``gm``'s graph as JSON-ready data."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op not in _NODE_OPS:
            raise Unserializable(f"node {n.name}: op {n.op}")
        target = n.target if n.op == "placeholder" else _target(n)
        nodes.append(
            {
                "op": n.op,
                "name": n.name,
                "target": target,
                "args": _value(n.args),
                "kwargs": {k: _value(v) for k, v in n.kwargs.items()},
            }
        )
    return {"nodes": nodes}


def load(data: dict) -> fx.GraphModule:
    """The ``GraphModule`` :func:`dump` describes (``ValueError`` / ``KeyError`` /
    ``TypeError`` on data it did not write)."""
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for d in data["nodes"]:
        op = d["op"]
        if op not in _NODE_OPS:
            raise ValueError(f"unknown node op {op!r}")
        target = d["target"] if op != "call_function" else _resolve(d["target"])
        if op == "placeholder" and not isinstance(target, str):
            raise TypeError("a placeholder's target is its name")
        args = _unvalue(d["args"], env)
        kwargs = {str(k): _unvalue(v, env) for k, v in d["kwargs"].items()}
        if op == "output":
            g.output(args[0])
            continue
        node = g.create_node(op, target, tuple(args), kwargs, name=str(d["name"]))
        env[str(d["name"])] = node
    return fx.GraphModule(torch.nn.Module(), g)


def _target(n: fx.Node) -> Any:
    t = n.target
    if n.op == "output":
        return "output"
    if isinstance(t, torch._ops.OpOverload):
        return {"op": str(t)}  # "aten.add.Tensor"
    name = _NAMES.get(id(t))
    if name is None:
        raise Unserializable(f"node {n.name}: target {t!r}")
    return {"fn": name}


def _resolve(t: Any) -> Any:
    if not isinstance(t, dict) or len(t) != 1:
        raise ValueError(f"bad target {t!r}")
    if "fn" in t:
        return _FUNCTIONS[t["fn"]]
    parts = str(t["op"]).split(".")
    if len(parts) != 3 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"bad op name {t['op']!r}")
    ns, name, overload = parts
    return getattr(getattr(getattr(torch.ops, ns), name), overload)


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)}
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, list):
        return [_value(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [_value(x) for x in v]}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    for kind, cls in _ENUMS.items():
        if isinstance(v, cls):
            return {kind: str(v).replace("torch.", "")}
    raise Unserializable(f"argument {v!r} ({type(v).__name__})")


def _unvalue(v: Any, env: dict[str, fx.Node]) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, list):
        return [_unvalue(x, env) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise ValueError(f"bad value {v!r}")
    ((kind, x),) = v.items()
    if kind == "float":
        return float(x)
    if kind == "node":
        return env[x]
    if kind == "tuple":
        return tuple(_unvalue(y, env) for y in x)
    if kind == "device":
        return torch.device(x)
    if kind in _ENUMS:
        found = getattr(torch, str(x), None)
        if not isinstance(found, _ENUMS[kind]):
            raise ValueError(f"bad {kind} {x!r}")
        return found
    raise ValueError(f"bad value kind {kind!r}")
