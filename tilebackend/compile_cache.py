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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _compat, settings
from .report import GraphReport, Replacement, Skipped

#: bump when the stored report format changes
REPORT_VERSION = 1

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


class ReportStore:
    """The reports of cached compiles, one JSON file per graph key, written atomically."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.dir = Path(directory) if directory else Path(_compat.inductor_cache_dir())
        self.dir = self.dir / "tilebackend_reports"
        self._warned = False

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def save(self, key: str, graphs: Sequence[GraphReport]) -> None:
        data = {"version": REPORT_VERSION, "graphs": [dataclasses.asdict(g) for g in graphs]}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, default=repr)
            os.replace(tmp, self.path(key))
        except OSError as e:  # a read-only cache dir: the compile goes on
            self._warn(f"could not store the report of a cached compile ({e})")

    def load(self, key: str) -> list[GraphReport] | None:
        """The stored reports, or ``None`` (missing, or unreadable: one warning)."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
            if data.get("version") != REPORT_VERSION:
                return None
            return [_graph_from_dict(g) for g in data["graphs"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._warn(f"ignoring the unreadable stored report {p} ({type(e).__name__}: {e})")
            return None

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"tilebackend: {msg}", RuntimeWarning, stacklevel=3)


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
