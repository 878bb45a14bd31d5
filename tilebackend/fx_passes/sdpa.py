"""Attention kernels chosen without grad, put back as ``scaled_dot_product_attention``.

The graph a training compile rewrites before autograd is traced under ``no_grad``.
``F.scaled_dot_product_attention`` picks its kernel when it is traced, and without grad
it may pick one that cannot be differentiated the way training needs: CPU flash
attention takes no gradient for ``attn_mask`` (T5's learned position bias), and the
memory-efficient kernel skips the log-sum-exp its backward reads.  Each such call (only
its first output read, as an inference trace leaves it) becomes the composite op again,
and the real compile, under grad, picks the kernel.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["restore_sdpa"]

aten = torch.ops.aten

#: the fused attention kernels, and their mask argument's name
_KERNELS = {
    "_scaled_dot_product_flash_attention": None,
    "_scaled_dot_product_flash_attention_for_cpu": "attn_mask",
    "_scaled_dot_product_efficient_attention": "attn_bias",
    "_scaled_dot_product_cudnn_attention": "attn_bias",
}


def _kernel_name(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target.overloadpacket.__name__
    return name if name in _KERNELS else None


def _bound(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _grouped(q: fx.Node, k: fx.Node) -> bool:
    """Not provably as many key heads as query heads (dim -3)."""
    hq, hk = (n.meta["val"].shape[-3] if "val" in n.meta else None for n in (q, k))
    return not (isinstance(hq, int) and isinstance(hk, int) and hq == hk)


def restore_sdpa(gm: fx.GraphModule) -> bool:
    """Put each fused attention kernel of ``gm`` back as ``scaled_dot_product_attention``.
    Returns False (``gm`` untouched) when one has an output other than the first read."""
    found = [(n, name) for n in gm.graph.nodes if (name := _kernel_name(n))]
    for node, _ in found:
        for u in node.users:
            if u.target is not operator.getitem or (u.args[1] != 0 and u.users):
                return False
    for node, name in found:
        a = _bound(node)
        mask = a.get(_KERNELS[name]) if _KERNELS[name] else None
        kwargs = {"is_causal": a.get("is_causal", False), "scale": a.get("scale")}
        if _grouped(a["query"], a["key"]):  # (the kernel took GQA's fewer k/v heads)
            kwargs["enable_gqa"] = True
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(
                aten.scaled_dot_product_attention.default,
                (a["query"], a["key"], a["value"], mask, a.get("dropout_p", 0.0)),
                kwargs,
            )
            sdpa.meta = dict(node.meta)
            val = node.meta.get("val")
            if isinstance(val, (tuple, list)):
                sdpa.meta["val"] = val[0]
        for u in list(node.users):
            if u.args[1] == 0:
                u.replace_all_uses_with(sdpa)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
    if found:
        gm.recompile()
    return True
