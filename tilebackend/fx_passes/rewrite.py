"""The tile rewrite pass: one pass over an ATen graph, used by both fallbacks."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch.fx as fx

from .. import _compat
from ..report import GraphReport, Replacement, Skipped, describe_value, short_target
from . import layout, matcher, shapes
from .registry import REGISTRY, Pattern

log = logging.getLogger("tilebackend")


def _candidates(patterns: Sequence[Pattern], table_key: str, report: GraphReport):
    """anchor target -> [(pattern, traced variant or None)], in priority order.

    A pattern whose search function cannot be traced for this graph's decompositions is
    left out (with a note and one warning); the others still run."""
    by_target: dict[object, list] = {}
    for p in patterns:
        if p.is_op_pattern:
            by_target.setdefault(p.search, []).append((p, None))
            continue
        try:
            tps = matcher.variants(p, table_key)
        except _compat.dynamo_control_flow():
            raise
        except Exception as e:
            _pattern_failed(report, p, "tracing its search function", e)
            continue
        for tp in tps:
            by_target.setdefault(matcher._norm_target(tp.anchor.target), []).append((p, tp))
    return by_target


def _pattern_failed(report: GraphReport, pattern: Pattern, what: str, e: Exception) -> str:
    why = f"{what} failed ({type(e).__name__}: {e})"
    report.notes.append(f"pattern {pattern.name!r}: {why}")
    warnings.warn(
        f"tilebackend: pattern {pattern.name!r}: {why}; the graph's other patterns still run",
        RuntimeWarning,
        stacklevel=3,
    )
    return why


class _Attempt:
    """Run one step of ``pattern`` at ``node``: ``(True, its result)``, or, when it
    raises, ``(False, None)`` with the pattern dropped from the graph and the reason
    noted, warned and listed among the node's rejections."""

    def __init__(self, report, pattern, node, failed: set, rejections: list) -> None:
        self.report, self.pattern, self.node = report, pattern, node
        self.failed, self.rejections = failed, rejections

    def __call__(self, what: str, fn):
        try:
            return True, fn()
        except _compat.dynamo_control_flow():
            raise
        except Exception as e:
            p, n = self.pattern, self.node
            self.failed.add(p.name)
            why = _pattern_failed(self.report, p, f"{what} at {n.name}", e)
            self.rejections.append(Skipped(n.name, str(n.target), p.name, why))
            return False, None


def rewrite(
    gm: fx.GraphModule, patterns: Sequence[Pattern], table_key: str, report: GraphReport
) -> int:
    """Replace every accepted match in ``gm`` in place; return how many were replaced."""
    by_target = _candidates(patterns, table_key, report)
    failed: set[str] = set()  # patterns whose replacement raised: tried no further here
    facts = shapes.Facts(shapes.shape_env_of(gm))
    graph = gm.graph
    erased: set[fx.Node] = set()
    replaced = 0
    before = layout.snapshot(graph)
    # outputs first: the pattern that reaches furthest downstream gets a node before a
    # smaller pattern nested inside it
    for node in reversed(list(graph.nodes)):
        if node in erased or node.op != "call_function":
            continue
        cands = by_target.get(matcher._norm_target(node.target))
        if not cands:
            continue
        rejections: list[Skipped] = []
        for pattern, tp in cands:
            if pattern.name in failed:
                continue
            attempt = _Attempt(report, pattern, node, failed, rejections)
            ok, res = attempt(
                "matching",
                lambda: (
                    matcher.match_op(pattern, node)
                    if tp is None
                    else matcher.match_traced(tp, pattern, node)
                ),
            )
            if not ok:
                continue
            if isinstance(res, str):
                # structural misses of traced patterns are noise; op patterns are reported
                if tp is None or res.startswith(("intermediate", "dtypes", "scalar")):
                    rejections.append(Skipped(node.name, str(node.target), pattern.name, res))
                continue
            real = res.values()
            reason = _run_check(pattern, real)
            if reason is not None:
                rejections.append(Skipped(node.name, str(node.target), pattern.name, reason))
                continue
            deferred, losers = _conflicts(pattern, res, node, cands, by_target)
            if deferred is not None:  # a higher-priority pattern matches inside this one
                report.skipped.append(deferred)
                continue
            entry = Replacement(
                pattern=pattern.name,
                nodes=[n.name for n in res.nodes],
                targets=[short_target(n.target) for n in res.nodes],
                inputs={k: describe_value(v) for k, v in res.values().items() if k in res.inputs},
                scalars=dict(res.scalars),
            )
            # (on failure the graph is left as it was)
            if not attempt("its replacement", lambda: matcher.apply(gm, res))[0]:
                continue
            erased.update(res.nodes)
            if not pattern.builtin:
                REGISTRY.mark_used(pattern)
            entry.proven, entry.runtime_checks = shapes.describe(real, facts)
            report.replacements.append(entry)
            report.skipped.extend(losers)
            log.debug("replaced %s", entry)
            replaced += 1
            rejections = []
            break
        report.skipped.extend(rejections[:1])
    report.replacements.reverse()  # visited outputs-first; report in graph order
    report.skipped.reverse()
    if replaced:
        layout.restore(gm, before, report.notes, outputs=report.name != "backward")
        graph.lint()
        gm.recompile()
    return replaced


def _run_check(pattern: Pattern, real: dict) -> str | None:
    """A built-in's check decides on size hints and adds no guard: its launcher re-checks
    the real sizes on every call.  A user pattern's replacement has no such re-check, so
    its check sees the symbolic values themselves: what it decides about a symbolic size
    becomes a shape guard, and Dynamo recompiles when a later size decides otherwise."""
    if pattern.builtin:
        return pattern.run_check({k: shapes.hinted(v) for k, v in real.items()}, real)
    return pattern.run_check(real, real)


def _accepted(pattern: Pattern, tp, node: fx.Node):
    """The match of ``pattern`` at ``node`` if its structure and check accept, else None."""
    if node.op != "call_function":
        return None
    res = matcher.match_op(pattern, node) if tp is None else matcher.match_traced(tp, pattern, node)
    if isinstance(res, str):
        return None
    real = res.values()
    if _run_check(pattern, real) is not None:
        return None
    return res


def _conflicts(winner: Pattern, res, anchor: fx.Node, cands, by_target):
    """Other patterns that also match (structure and check) on the nodes ``res`` covers.

    Returns ``(deferred, losers)``: ``deferred`` is a Skipped entry for ``winner`` when a
    pattern of higher priority matches inside its region (that pattern is applied when
    the rewrite reaches it); else ``losers`` are Skipped entries, one per pattern and node,
    saying which pattern they lost to and why."""
    losers: dict[tuple[str, str], Skipped] = {}
    later = [c for c in cands[[c[0] for c in cands].index(winner) + 1 :]]
    for m in res.nodes:
        here = later if m is anchor else by_target.get(matcher._norm_target(m.target), ())
        for q, tq in here:
            if q is winner or (m.name, q.name) in losers or _accepted(q, tq, m) is None:
                continue
            if q.priority > winner.priority:
                why = f"lost to {q.name} (priority {q.priority} > {winner.priority})"
                return Skipped(anchor.name, str(anchor.target), winner.name, why), []
            if q.priority < winner.priority:
                why = f"priority {winner.priority} > {q.priority}"
            elif m is anchor:
                why = f"priority {winner.priority} = {q.priority}, registered first"
            else:
                why = (
                    f"priority {winner.priority} = {q.priority}, matched first (further downstream)"
                )
            losers[(m.name, q.name)] = Skipped(
                m.name, str(m.target), q.name, f"lost to {winner.name} ({why})"
            )
    return None, list(losers.values())
