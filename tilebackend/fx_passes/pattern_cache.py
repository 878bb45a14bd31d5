"""Traced patterns on disk, so that a new process does not trace them again.

Tracing a search function to ATen the way AOTAutograd lowers models takes a full
``aot_function`` run per dtype and scalar (about 4 s for the built-ins on a 2-core CPU,
a third of a small model's compile).  A traced variant is a small graph; it is written
as JSON under ``<tuning cache dir>/patterns/`` and read back by later processes.

Only the built-in patterns are cached (a user's search function may depend on code the
key cannot see).  The key covers everything their trace depends on: the pattern's name,
the source file of its search function (any edit retraces), its scalars and example
inputs (shapes and dtypes), the dtype, the decomposition table's ops, and the torch and
tilebackend versions.  A file is used only if the graph rebuilt from it prints exactly as the traced
one did (its signature is stored); anything unreadable, stale or different is ignored
and traced afresh (logged, never raised).  ``TILEBACKEND_PATTERN_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger("tilebackend")

FORMAT = 1


class Unserializable(ValueError):
    """A traced graph holds a value this cache does not write (it is traced each time)."""


def enabled() -> bool:
    return os.environ.get("TILEBACKEND_PATTERN_CACHE", "1") not in ("0", "", "false", "False")


def folder() -> Path:
    from ..codegen.tuning_cache import default_cache_dir

    return default_cache_dir() / "patterns"


def key(pattern: Any, dtype: torch.dtype, table_key: str, table: dict | None) -> str | None:
    """The cache key of one traced variant, or None when it cannot be keyed safely."""
    from .. import __version__
    from ..codegen.tuning_cache import _file_hash

    code = getattr(pattern.search, "__code__", None)
    if code is None or not _ours(code.co_filename):
        return None  # (a user's pattern may call code elsewhere: traced each process)
    try:
        examples = [
            (tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else repr(t)
            for t in pattern.example_inputs(dtype)
        ]
    except Exception:
        return None
    parts = [
        FORMAT,
        pattern.name,
        code.co_name,
        _file_hash(code.co_filename),
        repr(sorted(pattern.scalars.items())),
        repr(examples),
        str(dtype),
        table_key,
        hashlib.sha256("|".join(sorted(map(str, table or {}))).encode()).hexdigest()[:16],
        torch.__version__,
        __version__,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _ours(filename: str) -> bool:
    """Whether a search function is one of tilebackend's own (built-in patterns): only
    their traces are cached, since only their dependencies are covered by the key."""
    package = Path(__file__).resolve().parents[1]
    try:
        return os.path.isfile(filename) and Path(filename).resolve().is_relative_to(package)
    except OSError:
        return False


# --- encoding -------------------------------------------------------------------------


def _target_name(t: Any) -> str:
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._schema.name.split('::', 1)[1]}.{t._overloadname}"
    raise Unserializable(f"target {t!r}")


def _target(name: str) -> Any:
    if name == "getitem":
        return operator.getitem
    qual, overload = name.rsplit(".", 1)
    ns, op = qual.split("::", 1)
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def _enc(v: Any, index: dict[fx.Node, int]) -> Any:
    from .matcher import Wildcard

    if isinstance(v, fx.Node):
        return {"node": index[v]}
    if isinstance(v, Wildcard):
        return {"wild": v.name}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": repr(v)}
    if isinstance(v, (list, tuple)):  # (fx's immutable_list is a list)
        return {"list" if isinstance(v, list) else "tuple": [_enc(x, index) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[k, _enc(x, index)] for k, x in v.items()]}
    for kind in ("dtype", "device", "layout", "memory_format"):
        if isinstance(v, getattr(torch, kind)):
            return {kind: str(v)}
    raise Unserializable(f"value {v!r} of type {type(v).__name__}")


def _dec(v: Any, nodes: list[fx.Node]) -> Any:
    from .matcher import Wildcard

    if not isinstance(v, dict):
        return v
    ((kind, x),) = v.items()
    if kind == "node":
        return nodes[x]
    if kind == "wild":
        return Wildcard(x)
    if kind == "int":
        return int(x)
    if kind == "float":
        return float(x)
    if kind == "list":
        return [_dec(e, nodes) for e in x]
    if kind == "tuple":
        return tuple(_dec(e, nodes) for e in x)
    if kind == "dict":
        return {k: _dec(e, nodes) for k, e in x}
    if kind == "dtype":
        return getattr(torch, x.removeprefix("torch."))
    if kind == "device":
        return torch.device(x)
    if kind in ("layout", "memory_format"):
        return getattr(torch, x.removeprefix("torch."))
    raise ValueError(f"unknown value kind {kind!r}")


def encode(tp: Any) -> dict:
    """A traced variant as JSON-able data (raises :class:`Unserializable`)."""
    nodes = list(tp.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    rows = []
    for n in nodes:
        val = n.meta.get("val")
        row: dict[str, Any] = {"op": n.op, "name": n.name}
        if isinstance(val, torch.Tensor):
            row["val"] = [val.dim(), str(val.dtype)]
        if n.op == "call_function":
            row["target"] = _target_name(n.target)
        if n.op in ("call_function", "output"):
            row["args"] = _enc(n.args, index)
            row["kwargs"] = _enc(dict(n.kwargs), index)
        elif n.op != "placeholder":
            raise Unserializable(f"node {n.op}")
        rows.append(row)
    return {
        "format": FORMAT,
        "nodes": rows,
        "params": list(tp.params),
        "placeholders": [index[p] for p in tp.placeholders],
        "outputs": [index[o] for o in tp.outputs],
        "anchor": index[tp.anchor],
        "signature": tp.signature(),
    }


def decode(data: dict) -> Any:
    """The traced variant ``data`` describes; ValueError when it does not rebuild to the
    graph it was written from."""
    from .matcher import TracedPattern

    if data.get("format") != FORMAT:
        raise ValueError("another format")
    graph = fx.Graph()
    nodes: list[fx.Node] = []
    for row in data["nodes"]:
        if row["op"] == "placeholder":
            n = graph.placeholder(row["name"])
        elif row["op"] == "call_function":
            n = graph.create_node(
                "call_function",
                _target(row["target"]),
                _dec(row["args"], nodes),
                _dec(row["kwargs"], nodes),
                name=row["name"],
            )
        elif row["op"] == "output":
            n = graph.output(_dec(row["args"], nodes)[0])
        else:
            raise ValueError(f"node kind {row['op']!r}")
        if "val" in row:  # (the matcher reads a value's rank; a meta tensor has one)
            rank, dt = row["val"]
            n.meta["val"] = torch.empty(
                (1,) * rank, dtype=getattr(torch, dt.removeprefix("torch.")), device="meta"
            )
        nodes.append(n)
    tp = TracedPattern(
        graph,
        list(data["params"]),
        [nodes[i] for i in data["placeholders"]],
        [nodes[i] for i in data["outputs"]],
        nodes[data["anchor"]],
    )
    if tp.signature() != data["signature"]:
        raise ValueError("the rebuilt graph differs from the traced one")
    return tp


# --- files ----------------------------------------------------------------------------


def load(k: str) -> Any | None:
    path = folder() / f"{k}.json"
    try:
        data = json.loads(path.read_text())
        return decode(data)
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt, truncated or stale file: trace instead
        log.info("pattern cache: ignoring %s (%s: %s)", path, type(e).__name__, e)
        return None


def store(k: str, tp: Any) -> None:
    from ..codegen.tuning_cache import _atomic_write

    try:
        text = json.dumps(encode(tp))
        path = folder() / f"{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
    except Unserializable as e:
        log.debug("pattern cache: not writing %s (%s)", k, e)
    except OSError as e:  # a read-only cache folder: trace next time too
        log.info("pattern cache: cannot write %s (%s)", k, e)
