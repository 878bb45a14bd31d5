"""What the backend did to each graph: replacements, and candidates left alone with why."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any


def describe_value(v: Any) -> str:
    shape = getattr(v, "shape", None)
    if shape is None:
        return repr(v)
    dims = ", ".join(str(s) for s in shape)
    return f"{str(v.dtype).replace('torch.', '')}[{dims}]"


def short_target(target: object) -> str:
    """``aten.mul.Tensor`` -> ``mul.Tensor``, ``aten.rsqrt.default`` -> ``rsqrt``."""
    return str(target).replace("aten.", "").replace(".default", "")


@dataclasses.dataclass
class Replacement:
    pattern: str
    nodes: list[str]
    targets: list[str]
    inputs: dict[str, str]
    scalars: dict[str, Any]
    #: facts about symbolic sizes proven without a guard
    proven: list[str] = dataclasses.field(default_factory=list)
    #: what could not be proven and is decided by the launcher at run time
    runtime_checks: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        ins = ", ".join(f"{k}={v}" for k, v in self.inputs.items())
        sc = "".join(f", {k}={v!r}" for k, v in self.scalars.items() if not k.startswith("_"))
        lines = [f"{self.pattern}: {' + '.join(self.targets)} ({ins}{sc})"]
        lines += [f"            proven: {p}" for p in self.proven]
        lines += [f"            run-time: {r}" for r in self.runtime_checks]
        return "\n".join(lines)


@dataclasses.dataclass
class Skipped:
    node: str
    target: str
    pattern: str
    reason: str

    def __str__(self) -> str:
        if self.pattern == "fusion":  # (a tile op that still runs its kernel, unfused)
            return f"{self.node} [{self.target}] not fused with its neighbours: {self.reason}"
        return f"{self.node} [{self.target}] left to the fallback by {self.pattern}: {self.reason}"


@dataclasses.dataclass
class GraphReport:
    name: str
    fallback: str = "?"
    replacements: list[Replacement] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: the symbols the graph's input sizes carry (empty for a static graph)
    symbolic: list[str] = dataclasses.field(default_factory=list)
    #: guards the backend added to the ShapeEnv while rewriting (none from the built-ins;
    #: a user pattern's check may add some)
    guards_added: list[str] = dataclasses.field(default_factory=list)
    #: the graph's code after rewriting and fusion (what the fallback compiles)
    code: str = ""

    @property
    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(r.pattern for r in self.replacements))


@dataclasses.dataclass
class Report:
    graphs: list[GraphReport] = dataclasses.field(default_factory=list)
    #: module floats made constants at the backend's request (``dynamic=True``), guarded
    specialized: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """``{pattern name: replacements}`` over every graph."""
        c: collections.Counter[str] = collections.Counter()
        for g in self.graphs:
            c.update(g.counts)
        return dict(c)

    @property
    def skipped(self) -> list[Skipped]:
        return [s for g in self.graphs for s in g.skipped]

    def __str__(self) -> str:
        lines = [f"tilebackend report: {len(self.graphs)} graph(s)"]
        for i, g in enumerate(self.graphs):
            lines.append(f"graph {i} ({g.name}, fallback={g.fallback}):")
            if g.symbolic:
                lines.append(f"  symbolic  {', '.join(g.symbolic)}")
                added = ", ".join(g.guards_added) if g.guards_added else "none"
                lines.append(f"  guards    added by tilebackend: {added}")
            for r in g.replacements:
                lines.append(f"  replaced  {r}")
            for s in g.skipped:
                lines.append(f"  {'unfused' if s.pattern == 'fusion' else 'left':9} {s}")
            for n in g.notes:
                lines.append(f"  note      {n}")
            if not (g.replacements or g.skipped or g.notes):
                lines.append("  (no candidates)")
        for s in self.specialized:
            lines.append(f"specialized {s} (a module's float: Dynamo re-traced it as a constant)")
        lines.append(f"counts: {self.counts}")
        return "\n".join(lines)
