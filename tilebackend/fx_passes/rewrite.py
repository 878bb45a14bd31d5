"""The tile rewrite pass: one pass over an ATen graph, used by both fallbacks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.fx as fx

from ..report import GraphReport, Replacement, Skipped, describe_value
from . import matcher
from .registry import Pattern

log = logging.getLogger("tilebackend")


def _candidates(patterns: Sequence[Pattern], table_key: str):
    """anchor target -> [(pattern, traced variant or None)], in priority order."""
    by_target: dict[object, list] = {}
    for p in patterns:
        if p.is_op_pattern:
            by_target.setdefault(p.search, []).append((p, None))
        else:
            for tp in matcher.variants(p, table_key):
                by_target.setdefault(matcher._norm_target(tp.anchor.target), []).append((p, tp))
    return by_target


def rewrite(
    gm: fx.GraphModule, patterns: Sequence[Pattern], table_key: str, report: GraphReport
) -> int:
    """Replace every accepted match in ``gm`` in place; return how many were replaced."""
    by_target = _candidates(patterns, table_key)
    graph = gm.graph
    erased: set[fx.Node] = set()
    replaced = 0
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
            res = (
                matcher.match_op(pattern, node)
                if tp is None
                else matcher.match_traced(tp, pattern, node)
            )
            if isinstance(res, str):
                # structural misses of traced patterns are noise; op patterns are reported
                if tp is None or res.startswith("intermediate"):
                    rejections.append(Skipped(node.name, str(node.target), pattern.name, res))
                continue
            reason = pattern.run_check(res.values())
            if reason is not None:
                rejections.append(Skipped(node.name, str(node.target), pattern.name, reason))
                continue
            entry = Replacement(
                pattern=pattern.name,
                nodes=[n.name for n in res.nodes],
                targets=[_short(n.target) for n in res.nodes],
                inputs={k: describe_value(v) for k, v in res.values().items() if k in res.inputs},
                scalars=dict(res.scalars),
            )
            erased.update(res.nodes)
            matcher.apply(gm, res)
            report.replacements.append(entry)
            log.debug("replaced %s", entry)
            replaced += 1
            rejections = []
            break
        report.skipped.extend(rejections[:1])
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced


def _short(target: object) -> str:
    s = str(target)
    return s.replace("aten.", "").replace(".default", "")
