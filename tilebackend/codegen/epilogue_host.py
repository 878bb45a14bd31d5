"""The host side shared by the generated GEMM-epilogue templates: :mod:`.fused_matmul`
(one result), :mod:`.fused_matmul_multi` (several results) and :mod:`.dual_matmul` (two
GEMMs over one ``A``).

Each template differs in its kernel source and its B operands; checking the operands,
laying out the arguments, tuning and launching, and the backward of the custom op are
the same, and live here once:

- :func:`check_operands`: why the tile kernel cannot take these inputs (or None).
- :func:`launch`: allocate the results, fold the leading dims, pass the extras through
  broadcast strides, build the tuning key, select a config and launch.
- :func:`recompute_backward`: the autograd formula of the custom ops (recompute the
  forward with eager ops under autograd and differentiate it).

Every template's kernel takes its arguments in one order: ``a``, the B operands, the
biases, the results, the extras; then ``M, N, K, L1``; the strides in the same order
(every result has the first result's strides; an extra has three, see
:func:`row_strides`); then one ``HAS_BIAS*`` flag per bias, one ``BIAS*_ROW`` flag per
bias, one ``IN{i}_MODE`` per extra (:func:`extra_mode`), ``INPUT_PRECISION``, ``EVEN_K``
and the config's block sizes.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._compat import interpret_mode
from . import _common, autotune, pointwise
from . import matmul as _mm

__all__ = [
    "EXTRA_DTYPES",
    "check_operands",
    "eager_gemm",
    "extra_args",
    "has_cast",
    "launch",
    "leaf_dtypes",
    "out_shape",
    "recompute_backward",
    "row_strides",
]

INT32_MAX = 2**31 - 1
#: the most batches a batched template launches (CUDA's limit of grid dim 1)
MAX_BATCH = 65535
#: dtypes an extra input may have (a bool extra is read as uint8)
EXTRA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool)


def out_shape(a, b, extras) -> tuple[int, ...]:
    """``a.shape[:-1] + (N,)`` broadcast with every extra's shape."""
    return tuple(_common.broadcast_shapes((*a.shape[:-1], b.shape[-1]), *(e.shape for e in extras)))


def eager_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as the templates read it, with eager ops: a ``b [batch, K, N]`` (a bmm)
    multiplies ``a`` viewed as ``[batch, M, K]``; the result is ``[*a.shape[:-1], N]``."""
    if b.dim() == 3:
        a3 = a.reshape(b.shape[0], a.shape[-2], a.shape[-1])
        return torch.bmm(a3, b).view(*a.shape[:-1], b.shape[-1])
    return torch.matmul(a, b)


def has_cast(e) -> bool:
    """Whether an expression has a ``to`` node (its printing then needs the leaf dtypes)."""
    return '"to"' in pointwise.dumps(e)


def leaf_dtypes(a, extras, accs: Sequence[str] = ("ACC",)) -> dict[str, torch.dtype]:
    """The eager dtype of each leaf: the GEMM results are in ``a``'s dtype; a 0-dim extra
    is marked :class:`~.pointwise.ZeroDim` (it promotes as eager's 0-dim tensors do)."""
    d: dict[str, Any] = {acc: a.dtype for acc in accs}
    d.update(
        {
            f"IN{i}": pointwise.ZeroDim(e.dtype) if e.dim() == 0 else e.dtype
            for i, e in enumerate(extras)
        }
    )
    return d


def check_operands(
    a: Any,
    bs: dict[str, Any],
    biases: dict[str, Any],
    extras: list,
    exprs: list[Any],
    accs: Sequence[str] = ("ACC",),
    batched: bool = False,
) -> str | None:
    """Why a GEMM-epilogue kernel cannot take ``a @ B + bias`` for each ``B`` of ``bs`` (all
    ``[K, N]``, one shape) with its bias, then ``exprs`` (parsed) over ``accs`` and the
    extras; or None.  The first expression is the result whose dtype must be a float one
    (the others are :mod:`.fused_matmul_multi`'s extra results, checked there).
    ``batched``: the template also takes one ``B [batch, K, N]`` with ``a [*, M, K]``
    whose dims before ``M`` fold to ``batch`` (a bmm), without a bias."""
    seeds: set[str] = set()
    for i, e in enumerate(exprs):
        which = "expression" if len(exprs) == 1 else f"expression {i}"
        seeds |= pointwise.seed_leaves(e)
        for leaf in sorted(pointwise.input_leaves(e)):
            if leaf in accs:
                continue
            if leaf.startswith("ACC"):
                return f"{which} reads {leaf}, a second GEMM (that is tile::dual_mm_epilogue)"
            if int(leaf[2:]) >= len(extras):
                return f"{which} reads {leaf} but only {len(extras)} extra input(s) are given"
    tensors = {"a": a, **bs, **{k: t for k, t in biases.items() if t is not None}}
    for name, t in tensors.items():
        r = _common.device_reason(t) or _common.dtype_reason(t) or _common.dot_reason(t)
        if r:
            return f"{name}: {r}"
    values = set().union(*map(pointwise.value_leaves, exprs))
    for i, t in enumerate(extras):
        if f"IN{i}" in seeds:
            if f"IN{i}" in values:
                return f"IN{i} is read both as a rand seed and as a value"
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() != 1:
                return f"IN{i}, a rand seed, is not a one-element int64 tensor"
            r = _common.device_reason(t)
        else:
            r = _common.device_reason(t) or _common.dtype_reason(t, EXTRA_DTYPES)
        if r:
            return f"IN{i}: {r}"
    devices = {t.device for t in (*tensors.values(), *extras)}
    if len(devices) > 1:
        return f"tensors are on different devices ({', '.join(sorted(map(str, devices)))})"
    if any(t.dtype != a.dtype for t in tensors.values()):
        return f"{', '.join(tensors)} must have one dtype"
    b = next(iter(bs.values()))
    if batched and b.dim() == 3:
        if len(bs) != 1 or a.dim() < 3 or math.prod(a.shape[:-2]) != b.shape[0]:
            return f"a batched b {tuple(b.shape)} needs a [*, M, K] a of that batch, got a {tuple(a.shape)}"
        if any(bias is not None for bias in biases.values()):
            return "a batched GEMM's epilogue takes no bias (add it in the expression)"
        if b.shape[0] > MAX_BATCH:
            return f"batch {b.shape[0]} is over the launch grid's {MAX_BATCH}"
    elif a.dim() < 1 or any(t.dim() != 2 for t in bs.values()):
        got = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items() if n in ("a", *bs))
        return f"expects a [*, K] and {', '.join(bs)} [K, N], got {got}"
    if any(tuple(t.shape) != tuple(b.shape) for t in bs.values()):
        return f"{' and '.join(f'{n} {tuple(t.shape)}' for n, t in bs.items())} differ in shape"
    if a.shape[-1] != b.shape[-2]:
        return f"inner sizes differ: a {tuple(a.shape)} @ b {tuple(b.shape)}"
    try:
        dtype = pointwise.infer_dtype(exprs[0], leaf_dtypes(a, extras, accs))
    except pointwise.ExprError as err:
        return f"expression: {err}"
    if dtype not in _common.SUPPORTED_DTYPES:
        return f"the expression's result dtype {dtype} is not supported"
    base = (*a.shape[:-1], b.shape[-1])
    try:
        shape = out_shape(a, b, [t for i, t in enumerate(extras) if f"IN{i}" not in seeds])
    except RuntimeError:
        return "extra inputs do not broadcast to the output"
    if shape != base:
        return f"extra inputs broadcast the output {base} to {shape} (not supported)"
    for name, bias in biases.items():
        if bias is None:
            continue
        if bias.dim() > 2 or (bias.dim() == 2 and a.dim() != 2):
            return f"{name} of shape {tuple(bias.shape)} is not [N] or [M, N]"
        try:
            _common.broadcast_shapes(bias.shape, (math.prod(a.shape[:-1]), b.shape[-1]))
        except RuntimeError:
            return f"{name} of shape {tuple(bias.shape)} does not broadcast to the output"
    if a.shape[-1] == 0:
        return "K == 0"
    if max(a.numel(), *(t.numel() for t in bs.values()), math.prod(shape)) > INT32_MAX:
        return "too large for 32-bit indexing"
    return None


def row_strides(t: torch.Tensor, lead: tuple[int, ...], n: int, inner: int = 1):
    """``t`` broadcast to ``[*lead, n]`` and its strides ``(s_outer, *s_inner, sn)``: the
    dims of ``lead`` before its last ``inner`` ones fold into one index with stride
    ``s_outer`` (0 when there are none), each of the last ``inner`` has its own.  With
    ``inner=1``, row ``(i0, i1)`` (``i1`` over the last leading dim) starts at
    ``i0 * s0 + i1 * s1``.  When the outer dims do not fold into one stride, a contiguous
    copy."""
    full = t.expand(*lead, n)
    for _ in range(2):
        st = full.stride()
        dims = [(size, st[i]) for i, size in enumerate(lead[:-inner]) if size != 1]
        if all(dims[j][1] == dims[j + 1][1] * dims[j + 1][0] for j in range(len(dims) - 1)):
            return full, (dims[-1][1] if dims else 0), *st[-inner - 1 :]
        full = full.contiguous()
    raise AssertionError("a contiguous tensor folds")


def extra_args(extras, lead: tuple[int, ...], n: int, batched: bool = False):
    """``(bools, tensors, strides, sbs)`` that pass ``extras`` to a generated kernel, each
    read as ``[*lead, n]``, bools as uint8.  Each extra's ``(s0, s1, sn)`` are in
    ``strides`` (see :func:`row_strides`), and ``sbs`` are zeros.  ``batched`` (a bmm,
    whose batch is ``lead[:-1]`` folded): the batch is read as two levels ``(b0, b1)``,
    ``b1`` over ``lead[-2]`` with stride ``s0`` and ``b0`` over the dims before it folded
    with stride ``sb`` in ``sbs``; ``s1`` is the rows'.  A ``[B, 1, T, S]`` mask of a
    ``[B, H, T, S]`` output is then read with no copy."""
    bools = tuple(t.dtype == torch.bool for t in extras)
    args, strides, sbs = [], [], []
    for t in extras:
        if batched:
            full, sb, s0, s1, sn = row_strides(t, lead, n, inner=2)
        else:
            (full, s0, s1, sn), sb = row_strides(t, lead, n), 0
        if t.dtype == torch.bool:
            full = full.view(torch.uint8)
        args.append(full)
        strides += [s0, s1, sn]
        sbs.append(sb)
    return bools, args, strides, sbs


#: ``IN{i}_MODE``, how a template reads extra ``i`` (a constexpr set from its strides):
#: a ``[BLOCK_M, BLOCK_N]`` tile, one row broadcast over M (``s0 == s1 == 0``, read as
#: ``[1, BLOCK_N]``) or one column broadcast over N (``sn == 0``, read as ``[BLOCK_M, 1]``).
#: A broadcast operand read as a tile holds a tile of registers: beside a 128 x 256
#: accumulator, that spills.
EXTRA_TILE, EXTRA_ROW, EXTRA_COL = 0, 1, 2


def extra_mode(s0: int, s1: int, sn: int) -> int:
    """The ``IN{i}_MODE`` of an extra read through row strides ``s0, s1`` and column
    stride ``sn`` (see :func:`row_strides`)."""
    if s0 == 0 and s1 == 0:
        return EXTRA_ROW
    return EXTRA_COL if sn == 0 else EXTRA_TILE


def _bias_arg(bias, M: int, N: int, unused: torch.Tensor):
    """A bias as the kernels read it: ``[M, N]`` through broadcast strides."""
    if bias is None:
        return unused, (0, 0)  # never read (its HAS_BIAS flag is False)
    full = bias.expand(M, N)
    return full, full.stride()


@functools.lru_cache(maxsize=1024)
def split_twin(cfg: autotune.Config) -> autotune.Config | None:
    """``cfg`` with its epilogue on two column halves (``EPI_SPLIT``), or None when its
    tile is under 128 x 64 or 64 x 128 (its epilogue fits in registers whole).  On sm_90
    a 128 x 128 tile's epilogue with a bias, a GELU, a residual tile and a mask then takes
    158 registers instead of 255 and 8 bytes of spills (persistent TMA config), and the
    4-warp tile's spills drop from 312 to 40 bytes (``compile_check``)."""
    if cfg.get("EPI_SPLIT") or cfg["BLOCK_N"] < 64 or cfg["BLOCK_M"] * cfg["BLOCK_N"] < 8192:
        return None
    return autotune.Config.make(cfg.num_warps, cfg.num_stages, **dict(cfg.kwargs), EPI_SPLIT=True)


def tma_layout(a2: torch.Tensor, b: torch.Tensor) -> str | None:
    """How a persistent TMA config can read ``a2 [M, K] @ b [K, N]``: ``"nk"`` when ``b``
    is ``W.t()`` of a row-major ``W [N, K]`` (a linear's weight), ``"kn"`` when ``b`` is
    row-major, None when TMA cannot (no Hopper, a dtype other than fp16/bf16, or an
    operand that is not row-major up to that transpose with 16-byte aligned rows)."""
    if a2.dtype not in (torch.float16, torch.bfloat16) or not _common.tma_capable(a2.device):
        return None
    size = a2.element_size()

    def rows_ok(t: torch.Tensor, row_stride: int) -> bool:
        return (row_stride * size) % 16 == 0 and t.data_ptr() % 16 == 0

    if a2.stride(1) != 1 or not rows_ok(a2, a2.stride(0)):
        return None
    if b.stride(0) == 1 and rows_ok(b, b.stride(1)):
        return "nk"
    if b.stride(1) == 1 and rows_ok(b, b.stride(0)):
        return "kn"
    return None


def launch(
    name: str,
    kernel_for: Callable[[tuple[bool, ...], dict | None], Any],
    a: torch.Tensor,
    bs: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    extras: list[torch.Tensor],
    exprs: list[Any],
    *,
    accs: Sequence[str] = ("ACC",),
    space: Callable[[torch.dtype, str], list[autotune.Config]] = _mm.config_space,
    heuristic: Callable[..., autotune.Config] = _mm.heuristic_config,
    jit_fns: tuple = (),
    tma_space: Callable[[torch.dtype], list[autotune.Config]] | None = None,
    terms: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> list[torch.Tensor]:
    """Run a generated GEMM-epilogue kernel: one result per expression of ``exprs``
    (parsed, already checked), each ``a.shape[:-1] + (N,)`` in its expression's dtype,
    contiguous (a bool result is written as uint8).

    ``kernel_for(bools, leaf_dtypes)`` gives the ``@triton.jit`` kernel for the extras'
    kinds (``leaf_dtypes`` is None unless an expression casts); the flags are
    ``HAS_BIAS`` for one bias, ``HAS_BIAS0, HAS_BIAS1, ...`` for several.  ``space`` and
    ``heuristic`` are the template's tuning space and first guess; ``jit_fns`` are the
    ``@triton.jit`` helpers its source calls (for the tuning key).  ``tma_space``: the
    template has a persistent TMA main loop (constexprs ``TMA`` and ``B_NK``), and these
    are its configs (``TMA=True``), tuning candidates where :func:`tma_layout` reads
    every B operand one way.  ``terms``: more ``(A_t [*, K_t], B_t [K_t, N])`` GEMMs whose
    products the template adds into the accumulator (after the extras in the arguments:
    their pointers, then each one's ``K_t`` and strides, and an ``EVEN_K{t}`` flag).
    A template with the constexpr ``BATCHED`` (and ``stride_ab``, ``stride_bb``) also runs
    a bmm: one ``B [batch, K, N]``, ``a`` read as ``[batch, M, K]``, grid ``(tiles,
    batch)``, tuned per batch-matrix shape."""
    ldt = leaf_dtypes(a, extras, accs)
    out_dtypes = [pointwise.infer_dtype(e, ldt) for e in exprs]
    K, N = a.shape[-1], bs[0].shape[-1]
    lead = tuple(a.shape[:-1])
    M = math.prod(lead)
    outs = [_common.empty((*lead, N), dt, a.device) for dt in out_dtypes]
    if M == 0 or N == 0:
        return outs
    # a bmm (one B [batch, K, N]): ``a`` as [batch, rows, K], the batch on grid axis 1
    batched = bs[0].dim() == 3
    batch, m_rows = (bs[0].shape[0], lead[-1]) if batched else (1, M)
    # a view when the leading dims fold (else one copy)
    a2 = a.reshape(batch, m_rows, K) if batched else a.reshape(M, K)
    outs2 = [o.view(M, N) for o in outs]
    outs2 = [o.view(torch.uint8) if o.dtype == torch.bool else o for o in outs2]
    bias_args = [_bias_arg(bias, M, N, outs2[0]) for bias in biases]
    lead = lead or (1,)
    bools, ex_args, ex_strides, ex_sbs = extra_args(extras, lead, N, batched)
    cast = any(has_cast(e) for e in exprs)
    kernel = kernel_for(bools, ldt if cast else None)
    precision = _mm._input_precision(a.dtype)
    flags = ["HAS_BIAS"] if len(biases) == 1 else [f"HAS_BIAS{i}" for i in range(len(biases))]
    has_bias = {f: bias is not None for f, bias in zip(flags, biases)}
    # a bias that is one row over N (a linear's) is read as a vector
    rows = ["BIAS_ROW"] if len(biases) == 1 else [f"BIAS{i}_ROW" for i in range(len(biases))]
    bias_row = {f: b is not None and st[0] == 0 for f, b, (_, st) in zip(rows, biases, bias_args)}
    # (a bmm's extras are at their batch already: only the row stride says if one is a row)
    modes = {
        f"IN{i}_MODE": extra_mode(0 if batched else st[0], st[1], st[2])
        for i, st in enumerate(zip(*[iter(ex_strides)] * 3))
    }
    terms2 = [(ta.reshape(M, ta.shape[-1]), tb) for ta, tb in terms]
    tensors = [a2, *bs, *(t for t, _ in bias_args), *outs2, *ex_args]
    tensors += [t for pair in terms2 for t in pair]
    strides = [*a2.stride()[-2:]]
    for t in bs:
        strides += t.stride()[-2:]
    for _, st in bias_args:
        strides += st
    strides += [*outs2[0].stride(), *ex_strides]
    for ta, tb in terms2:
        strides += [ta.shape[1], *ta.stride(), *tb.stride()]
    even = {f"EVEN_K{t}": ta.shape[1] for t, (ta, _) in enumerate(terms2)}

    arg_names = getattr(kernel, "arg_names", ())
    splits = "EPI_SPLIT" in arg_names  # (the template has it)
    if "BATCHED" in arg_names:
        bstrides = (a2.stride(0), bs[0].stride(0)) if batched else (0, 0)
        batch_kw = {"stride_ab": bstrides[0], "stride_bb": bstrides[1], "BATCHED": batched}
        batch_kw["B1"] = lead[-2] if batched else 1
        batch_kw.update({f"in{i}_sb": sb for i, sb in enumerate(ex_sbs)})
    else:
        batch_kw = {}
    can_tma = tma_space is not None and not batched
    layouts = {tma_layout(a2, b) for b in bs} if can_tma else {None}
    layout = layouts.pop() if len(layouts) == 1 else None
    flags = {"B_NK": layout == "nk"} if tma_space is not None else {}

    def run(cfg: autotune.Config) -> None:
        if cfg.get(autotune.EXTERN) is not None:
            _unfused(outs, a2, bs, biases, extras, exprs, accs, terms2, (*lead, N))
            return
        tiles = _common.cdiv(m_rows, cfg["BLOCK_M"]) * _common.cdiv(N, cfg["BLOCK_N"])
        kw = cfg.as_kwargs()
        if cfg.get("TMA") and not batched:  # (a bmm's key never holds a TMA config; a
            # foreign tuning file's could: its pointer-loop twin runs instead)
            grid = (min(tiles, _common.persistent_programs(a.device)),)
        else:
            grid = (tiles, batch) if batched else (tiles,)
            if tma_space is not None:
                kw["TMA"] = False
        if splits:
            kw.setdefault("EPI_SPLIT", False)
        _common.launch(
            kernel,
            grid,
            *tensors,
            m_rows,
            N,
            K,
            lead[-1],
            *strides,
            **batch_kw,
            **has_bias,
            **bias_row,
            **modes,
            INPUT_PRECISION=precision,
            EVEN_K=K % cfg["BLOCK_K"] == 0,
            **{f: k % cfg["BLOCK_K"] == 0 for f, k in even.items()},
            **flags,
            **kw,
        )

    bucket = autotune.bucket
    text = "\n".join(pointwise.dumps(e) for e in exprs)
    key = (
        a.dtype,
        tuple(out_dtypes),
        bucket(m_rows),
        *(("bmm", bucket(batch)) if batched else ()),
        bucket(N),
        bucket(K),
        tuple(has_bias.values()),
        tuple(bias_row.values()),
        tuple(modes.values()),
        precision,
        a2.stride(-1) == 1,
        tuple(t.stride(-1) == 1 for t in bs),
        hashlib.sha256(text.encode()).hexdigest()[:12],
        bools,
        tuple(ldt.values()) if cast else (),
        layout,
        *(
            (
                tuple(
                    (bucket(ta.shape[1]), ta.stride(-1) == 1, tb.stride(-1) == 1)
                    for ta, tb in terms2
                ),
            )
            if terms2
            else ()
        ),
    )
    configs, first = _mm.tuning_choices(space, heuristic, a.dtype, precision, m_rows, N, K)
    if layout is not None and min(M, N) >= 64:  # (smaller: no tile of theirs is full)
        configs += _mm.prune_configs(tma_space(a.dtype), M, N, K)
    if splits:  # each wide tile's split twin is a candidate too; a 128 x 128 one's first
        configs += [t for t in map(split_twin, configs) if t is not None]
        if first["BLOCK_M"] * first["BLOCK_N"] >= 128 * 128:
            first = split_twin(first) or first
    if not interpret_mode() and not any(pointwise.seed_leaves(e) for e in exprs):
        configs.append(_mm.ATEN_CONFIG)  # timed beside ours: never slower than unfused
    cfg = autotune.select(
        name, key, configs, first, run, outputs=lambda: outs, fn=(kernel, *jit_fns)
    )
    run(cfg)
    return outs


def _unfused(outs, a2, bs, biases, extras, exprs, accs, terms2, shape) -> None:
    """The baseline a fused kernel must beat: ATen's GEMMs (cuBLAS on a GPU; the sum
    template's terms added to its one accumulator), then the expressions in eager ops
    (eager's dtypes and rounding), copied into ``outs``.  Expressions that draw random
    numbers have no such baseline (the kernel's stream is its own)."""
    leaves: dict[str, Any] = {}
    for name, b, bias in zip(accs, bs, biases):
        acc = a2 @ b if bias is None else torch.addmm(bias, a2, b)
        for ta, tb in terms2:
            acc = acc + ta @ tb
        leaves[name] = acc.view(shape)
        _common.launch_counts["aten_gemm"] += 1
    leaves.update({f"IN{i}": e for i, e in enumerate(extras)})
    for out, e in zip(outs, exprs):
        r = pointwise.evaluate(e, leaves, shape)
        if isinstance(r, torch.Tensor):
            out.copy_(r)
        else:
            out.fill_(r)


def recompute_backward(
    ctx,
    grads: Sequence[torch.Tensor | None],
    reference: Callable[..., Any],
    n_fixed: int,
    list_lens: Sequence[int] = (),
) -> list:
    """Gradients of a GEMM-epilogue custom op whose ``ctx.saved_tensors`` are its
    ``n_fixed`` leading tensor arguments (None where absent), then the items of its
    tensor-list arguments (``list_lens`` gives the length of each but the last, the
    extras, which take the rest), with ``ctx.args`` the non-tensor arguments after them:
    the forward is recomputed with ``reference(*fixed, *lists, *ctx.args)`` under
    autograd and differentiated.  Returns one gradient per input of the op (a list per
    list argument, None for the non-tensor ones)."""
    need = ctx.needs_input_grad
    saved = list(ctx.saved_tensors)
    bounds = [n_fixed]
    for n in list_lens:
        bounds.append(bounds[-1] + n)
    bounds.append(len(saved))
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(t.is_floating_point()) if t is not None else None
            for t in saved
        ]
        lists = [leaves[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        outs = reference(*leaves[:n_fixed], *lists, *ctx.args)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        if pairs and wanted:
            got = torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
        else:
            got = [None] * len(wanted)
    it = iter(got)
    g = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
    fixed = [g[i] if need[i] else None for i in range(n_fixed)]
    grad_lists = [
        [gi if need[n_fixed + j] else None for gi in g[lo:hi]]
        for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
    ]
    return [*fixed, *grad_lists, *(None for _ in ctx.args)]
