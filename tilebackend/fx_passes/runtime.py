"""The last pass before a graph is handed to the fallback: call each tile op through its
dispatch-light twin (:mod:`tilebackend.codegen.runtime_ops`)."""

from __future__ import annotations

import torch.fx as fx

from ..codegen import runtime_ops

__all__ = ["use_runtime_ops"]


def use_runtime_ops(gm: fx.GraphModule) -> int:
    """Point every ``tile::`` call of ``gm`` (a graph that runs without autograd: a
    compiled forward, backward or inference graph) at its twin; returns how many."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        namespace = getattr(node.target, "namespace", None)
        if namespace not in runtime_ops.NAMESPACES:
            continue
        rt = runtime_ops.twin(node.target)
        if rt is not None:
            node.target = rt
            n += 1
    if n:
        gm.recompile()
    return n
