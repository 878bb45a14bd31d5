"""Sums of GEMMs in a matmul epilogue (see :mod:`.fusion`).

A backward graph's gradient of an input several linears read is ``dq @ Wq + dk @ Wk +
dv @ Wv``; the epilogue pass makes it ``mm_epilogue(dv, Wv, extras=[dk @ Wk, dq @ Wq],
"ACC + IN0 + IN1")``, so the other GEMMs' results are written and read back.  When an
extra is a plain GEMM result used only there, and the expression adds it straight to the
accumulator (``add(ACC, INk)``, in any order and nesting of such adds), the GEMM joins
the kernel as a term of ``tile::mm_sum_epilogue`` and the extra goes away.  These are
the expression rewrites; the graph side is :meth:`.fusion_matmul.MatmulFusions._fuse_closed`.
"""

from __future__ import annotations

from typing import Any


def _leaf_index(e: Any) -> int | None:
    if isinstance(e, str) and e.startswith("IN") and e[2:].isdigit():
        return int(e[2:])
    return None


def _count(e: Any, leaf: str) -> int:
    if e == leaf:
        return 1
    if isinstance(e, tuple):
        return sum(_count(x, leaf) for x in e[1:])
    return 0


def absorb(expr: Any, candidates: set[int], limit: int) -> tuple[Any, list[int]]:
    """``expr`` with each ``add(ACC, INk)`` (``k`` in ``candidates``, read once in
    ``expr``) replaced by ``ACC``, bottom up, at most ``limit`` of them; and the ``k``
    absorbed, in the order found."""
    once = {k for k in candidates if _count(expr, f"IN{k}") == 1}
    taken: list[int] = []

    def walk(e: Any) -> Any:
        if not isinstance(e, tuple):
            return e
        args = tuple(walk(x) for x in e[1:])
        if e[0] == "add" and len(args) == 2 and len(taken) < limit:
            for p, q in (args, args[::-1]):
                k = _leaf_index(q)
                if p == "ACC" and k is not None and k in once and k not in taken:
                    taken.append(k)
                    return "ACC"
        return (e[0], *args)

    return walk(expr), taken


def renumber(expr: Any, mapping: dict[int, int]) -> Any:
    """``expr`` with each ``INk`` read as ``IN{mapping[k]}``."""
    k = _leaf_index(expr)
    if k is not None:
        return f"IN{mapping[k]}"
    if isinstance(expr, tuple):
        return (expr[0], *(renumber(x, mapping) for x in expr[1:]))
    return expr
