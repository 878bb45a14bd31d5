"""Warm compiles through AOTAutograd's cache (Inductor fallback).

Plain Inductor skips AOTAutograd's trace, its joint-graph passes and the FX graph
cache lookups on a warm compile: AOTAutograd's cache, keyed by the Dynamo graph,
serves the compiled forward and backward.  That key knows nothing of our rewrite,
which runs inside the compile, so we add a tag to it (torch's ``cache_key_tag``) that
stands for everything the rewrite depends on:

- tilebackend's own source (every ``.py`` file of the package);
- the compile-time settings, the mode and the fallback;
- the built-in patterns in use, the Triton version, and the interpreter flag (on CPU
  the kernels are matched only in Triton's interpreter).

A graph is not cached (AOTAutograd's cache stays off for it) when:

- a user pattern is active: a Python function's behaviour has no stable hash;
- ``verify`` is on: its check runs on the graph's first call, around our rewrite;
- a training graph's run-time settings (tuning, poison) differ from the environment's:
  the cached backward would run outside this backend's settings scope;
- ``compile_cache=False`` (env ``TILEBACKEND_COMPILE_CACHE=0``).

A cache hit skips our rewrite, so what it did is stored beside Inductor's cache
(``<inductor cache dir>/tilebackend_reports``) and put back in the report on a hit.

Training graphs are rewritten once more, before autograd (``backend._pre_autograd``),
and AOTAutograd's key is taken of that rewritten graph: a warm compile would still pay
the trace and the rewrite to learn it.  So the rewritten graph itself is stored too
(``tilebackend_graphs``, its nodes as JSON: ``fx_passes/serialize.py``),
keyed by what the trace reads (:func:`pre_autograd_key`), and a cacheable graph always
continues from its stored form, even on the compile that stores it: cold and warm
compiles hand AOTAutograd the same graph, so the warm one hits.  The directory is as
trusted as Inductor's cache beside it, whose generated code Inductor imports.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _compat, settings
from .report import GraphReport, Replacement, Skipped

log = logging.getLogger("tilebackend")

#: bump when the stored report format changes
REPORT_VERSION = 1
#: bump when the stored pre-autograd graph format changes
GRAPH_VERSION = 2
#: roots of the modules whose functions a cacheable graph may call (their behaviour is
#: fixed by the torch version in the key; a user's function is not)
_PLAIN_MODULES = ("torch", "_operator", "operator", "builtins", "math")

#: settings the tile kernels read while running (the rest act at compile time)
RUNTIME_SETTINGS = ("autotune", "search", "tune_budget_s", "tuning", "poison_outputs")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over tilebackend's Python sources (paths and contents)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def tag(
    s: settings.Settings, mode: str, fallback: str, patterns: Sequence[Any], training: bool
) -> str | None:
    """The cache-key tag for a compile with these settings, or ``None``: do not cache."""
    if not s.compile_cache or s.verify:
        return None
    if any(not getattr(p, "builtin", False) for p in patterns):
        return None
    if training:
        env = settings.Settings.from_env()
        if any(getattr(s, f) != getattr(env, f) for f in RUNTIME_SETTINGS):
            return None
    import triton

    parts = [
        source_hash(),
        repr(s),
        mode,
        fallback,
        ",".join(sorted(p.name for p in patterns)),
        triton.__version__,
        str(_compat.interpret_mode()),
    ]
    return "tile-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def graph_key(tag_: str, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Key of the stored report: the tag, the graph's code and its inputs' metadata
    (symbolic where Dynamo made sizes symbolic: a hit may come at other sizes)."""
    h = hashlib.sha256(tag_.encode())
    h.update(gm.code.encode())
    h.update(str(torch.is_grad_enabled()).encode())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(example_inputs):
        values = [n.meta.get("example_value", x) for n, x in zip(placeholders, example_inputs)]
    else:
        values = list(example_inputs)
    for x in values:
        if isinstance(x, torch.Tensor):
            meta = (x.dtype, tuple(x.shape), x.stride(), x.device.type, x.requires_grad)
            h.update(repr(meta).encode())
        else:
            h.update(repr(type(x)).encode())
    return h.hexdigest()


class _Store:
    """Files beside Inductor's cache, one per key, written atomically; an unwritable
    or unreadable file costs one warning, never the compile."""

    subdir = suffix = ""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.dir = Path(directory) if directory else Path(_compat.inductor_cache_dir())
        self.dir = self.dir / self.subdir
        self._warned = False

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{self.suffix}"

    def _write(self, key: str, data: bytes, what: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(key))
        except OSError as e:  # a read-only cache dir: the compile goes on
            self._warn(f"could not store {what} ({e})")

    def _read(self, key: str, version: int, convert, what: str, errors=(Exception,)):
        """``convert(data)`` of the stored JSON, or ``None``: missing, of another
        ``version``, or unreadable (one of ``errors``: one warning)."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
            if data.get("version") != version:
                return None
            return convert(data)
        except errors as e:
            self._warn(f"ignoring the unreadable stored {what} {p} ({type(e).__name__}: {e})")
            return None

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"tilebackend: {msg}", RuntimeWarning, stacklevel=4)


class ReportStore(_Store):
    """The reports of cached compiles, one JSON file per graph key."""

    subdir, suffix = "tilebackend_reports", ".json"

    def save(self, key: str, graphs: Sequence[GraphReport]) -> None:
        data = {"version": REPORT_VERSION, "graphs": [dataclasses.asdict(g) for g in graphs]}
        self._write(key, json.dumps(data, default=repr).encode(), "the report of a cached compile")

    def load(self, key: str) -> list[GraphReport] | None:
        """The stored reports, or ``None`` (missing, or unreadable: one warning)."""
        return self._read(
            key,
            REPORT_VERSION,
            lambda data: [_graph_from_dict(g) for g in data["graphs"]],
            "report",
            (OSError, ValueError, KeyError, TypeError, AttributeError),
        )


def _graph_from_dict(d: dict) -> GraphReport:
    d = dict(d)
    d["replacements"] = [Replacement(**r) for r in d.get("replacements", [])]
    d["skipped"] = [Skipped(**s) for s in d.get("skipped", [])]
    return GraphReport(**d)


def cached_report(name: str, fallback: str) -> GraphReport:
    """The entry for a cache hit whose stored report is gone."""
    return GraphReport(
        name=name,
        fallback=fallback,
        notes=["served from AOTAutograd's cache; the report of its rewrite was not found"],
    )


def pre_autograd_key(tag_: str, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """Key of a training graph's pre-autograd rewrite, or ``None``: not cacheable.

    The key covers what AOTAutograd's trace reads: the tag, the graph's code, its
    inputs' metadata (symbolic where Dynamo made sizes symbolic, devices with their
    index), grad mode, and global state (:func:`_compat.trace_state`).  Graphs whose
    code does not spell out their behaviour are not cached: a submodule or attribute
    (``call_module``, ``get_attr``), a user's function or custom op, a higher-order op;
    nor are inputs that share storage or are tensor subclasses."""
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            return None
        if n.op == "call_function" and not _plain_callable(n.target):
            return None
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not all(_compat.is_plain_tensor(x) for x in tensors):
        return None
    if len({_compat.storage_ref(x) for x in tensors}) != len(tensors):
        return None
    h = hashlib.sha256(f"pre-autograd\0{tag_}\0".encode())
    h.update(gm.code.encode())
    h.update(repr((torch.is_grad_enabled(), _compat.trace_state())).encode())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    for n, x in zip(placeholders, example_inputs):
        v = n.meta.get("example_value", x)
        if isinstance(x, torch.Tensor):
            meta = (v.dtype, tuple(v.shape), v.stride(), v.storage_offset(), str(x.device))
            h.update(repr((*meta, x.requires_grad, type(x).__name__)).encode())
        else:
            h.update(repr(type(v)).encode())
    return h.hexdigest()


def _plain_callable(target: Any) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return _compat.is_core_op(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in _PLAIN_MODULES


class GraphStore(_Store):
    """Training graphs rewritten before autograd, one JSON file per key
    (``fx_passes/serialize.py``: the nodes as they are; loading runs and imports
    nothing).  :meth:`store` gives a graph in the form a later :meth:`load` gives."""

    subdir, suffix = "tilebackend_graphs", ".json"

    def store(
        self, key: str, gm: torch.fx.GraphModule | None, report: GraphReport | None
    ) -> torch.fx.GraphModule | None:
        """Store ``gm`` (``None``: the trace found nothing to rewrite) and its report;
        returns the graph as :meth:`load` will give it, or ``gm`` itself (not stored)
        when the format cannot describe it."""
        from .fx_passes import serialize

        entry = {
            "version": GRAPH_VERSION,
            "graph": None,
            "report": None if report is None else dataclasses.asdict(report),
        }
        try:
            entry["graph"] = None if gm is None else serialize.dump(gm)
            data = json.dumps(entry, default=repr)
            graph = json.loads(data)["graph"]
            loaded = None if graph is None else serialize.load(graph)
        except Exception as e:  # (Unserializable, or a bug here: never the compile's)
            log.info("not storing the rewritten training graph: %s: %s", type(e).__name__, e)
            return gm
        self._write(key, data.encode(), "a rewritten training graph")
        return loaded

    def load(self, key: str) -> tuple[torch.fx.GraphModule | None, GraphReport | None] | None:
        """``(graph, report)`` as stored, or ``None`` (missing, or unreadable: one
        warning, and the graph is traced afresh: any damage is caught)."""
        from .fx_passes import serialize

        def convert(entry: dict):
            graph, report = entry["graph"], entry["report"]
            gm = None if graph is None else serialize.load(graph)
            return gm, None if report is None else _graph_from_dict(report)

        return self._read(key, GRAPH_VERSION, convert, "graph")
