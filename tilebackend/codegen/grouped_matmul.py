"""Grouped GEMM over one ``A``: ``out_g = A @ B_g + bias_g`` for up to four ``B_g``, one launch.

Attention projects one normalized input three times (BERT's, ViT's and Llama's query,
key and value linears) and a gated MLP twice.  Three GEMMs of one ``A`` cost three
launches, and each fills the GPU by itself: a Llama key projection (``N`` = 256 for 4
KV heads) has 64 tiles of 128 x 128 at 4096 tokens, half a wave on 132 SMs.
``tile::grouped_mm`` runs them as one grid over the concatenated column tiles: a
program finds its group from its column tile, then runs :mod:`.matmul`'s main loop on
that group's ``B`` and writes that group's result (no weight is copied or
concatenated).  The fusion pass builds the call from plain GEMMs of one ``A``
(``fx_passes/fusion_matmul.py``).

Shapes: ``a`` is ``[M, K]``, each ``B_g`` is ``[K, N_g]`` (any strides: a weight comes as
``W.t()``), one dtype; each group's bias is absent or a ``[N_g]`` vector (Whisper's key
projection has none, its query and value ones do).  Results are
``[M, N_g]``, contiguous, in the input dtype.  On a GPU the tuner also times ATen's
GEMMs one after another (cuBLAS), so the grouped call is never slower than them.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .._compat import interpret_mode
from ..exc import KernelError
from . import _common, autotune, plans
from . import matmul as _mm

__all__ = ["KERNEL_NAMES", "MAX_GROUPS", "check", "grouped_matmul", "reference", "sm90_specs"]

KERNEL_NAMES = ("grouped_mm",)
#: the most GEMMs one launch takes
MAX_GROUPS = 4


@triton.jit
def _grouped_mm_kernel(
    a_ptr,  # [M, K], any strides
    b0_ptr,  # [K, N0], any strides
    b1_ptr,  # [K, N1]
    b2_ptr,  # [K, N2] (fewer groups: b0's pointer, N2 = 0)
    b3_ptr,  # [K, N3]
    c0_ptr,  # [N0] bias (unread unless HAS_BIAS and h0)
    c1_ptr,  # [N1]
    c2_ptr,  # [N2]
    c3_ptr,  # [N3]
    o0_ptr,  # [M, N0] result, contiguous
    o1_ptr,  # [M, N1]
    o2_ptr,  # [M, N2]
    o3_ptr,  # [M, N3]
    M,
    K,
    N0,
    N1,
    N2,
    N3,
    stride_am,
    stride_ak,
    s0k,  # B strides of each group: k, n
    s0n,
    s1k,
    s1n,
    s2k,
    s2n,
    s3k,
    s3n,
    c0n,  # bias strides of each group
    c1n,
    c2n,
    c3n,
    h0,  # 1 when that group has a bias, else 0
    h1,
    h2,
    h3,
    HAS_BIAS: tl.constexpr,  # some group has one
    INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    t0 = tl.cdiv(N0, BLOCK_N)  # where each group's column tiles end
    t01 = t0 + tl.cdiv(N1, BLOCK_N)
    t012 = t01 + tl.cdiv(N2, BLOCK_N)
    t0123 = t012 + tl.cdiv(N3, BLOCK_N)
    # the column tiles of every group side by side, in grouped-M order
    pid_m, pid_n = _mm.grouped_tile(M, t0123 * BLOCK_N, BLOCK_M, BLOCK_N, GROUP_M)
    # this tile's group: its operands feed one main loop (the compiler keeps what the
    # pointers and strides of every group share, e.g. 16-byte alignment: a main loop per
    # group would not share its shared memory with the others)
    if pid_n < t0:
        b_ptr, sk, sn, c_ptr, cn, o_ptr, N, hb = b0_ptr, s0k, s0n, c0_ptr, c0n, o0_ptr, N0, h0
        tile_n = pid_n
    elif pid_n < t01:
        b_ptr, sk, sn, c_ptr, cn, o_ptr, N, hb = b1_ptr, s1k, s1n, c1_ptr, c1n, o1_ptr, N1, h1
        tile_n = pid_n - t0
    elif pid_n < t012:
        b_ptr, sk, sn, c_ptr, cn, o_ptr, N, hb = b2_ptr, s2k, s2n, c2_ptr, c2n, o2_ptr, N2, h2
        tile_n = pid_n - t01
    else:
        b_ptr, sk, sn, c_ptr, cn, o_ptr, N, hb = b3_ptr, s3k, s3n, c3_ptr, c3n, o3_ptr, N3, h3
        tile_n = pid_n - t012
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] within the group
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _mm.gemm_mainloop(
        a_ptr,
        b_ptr,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        K,
        stride_am,
        stride_ak,
        sk,
        sn,
        INPUT_PRECISION,
        EVEN_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    if HAS_BIAS:  # one row over N: a [BLOCK_N] vector (read only where the group has one)
        bias = tl.load(c_ptr + offs_n * cn, mask=offs_n < N * hb, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = o_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --- host -----------------------------------------------------------------------------


@_common.memo_reason
def check(a: Any, bs: Any, biases: Any) -> str | None:
    """Why :func:`grouped_matmul` cannot run the tile kernel for these inputs, or None."""
    bs, biases = list(bs), list(biases)
    if not 2 <= len(bs) <= MAX_GROUPS:
        return f"expects 2 to {MAX_GROUPS} B operands, got {len(bs)}"
    if len(biases) != len(bs):
        return f"{len(biases)} biases for {len(bs)} B operands (one each, None for none)"
    tensors = {"a": a, **{f"b{i}": b for i, b in enumerate(bs)}}
    tensors.update({f"bias{i}": c for i, c in enumerate(biases) if c is not None})
    for name, t in tensors.items():
        r = _common.device_reason(t) or _common.dtype_reason(t) or _common.dot_reason(t)
        if r:
            return f"{name}: {r}"
    if len({t.device for t in tensors.values()}) > 1:
        return "tensors are on different devices"
    if len({t.dtype for t in tensors.values()}) > 1:
        return "mixed dtypes: " + ", ".join(f"{k} {t.dtype}" for k, t in tensors.items())
    if a.dim() != 2 or any(b.dim() != 2 for b in bs):
        return "expects a [M, K] and each B [K, N]"
    for i, b in enumerate(bs):
        if b.shape[0] != a.shape[1]:
            return f"inner sizes differ: a {tuple(a.shape)} @ b{i} {tuple(b.shape)}"
    for i, (b, c) in enumerate(zip(bs, biases)):
        if c is not None and (c.dim() != 1 or c.shape[0] != b.shape[1]):
            return f"bias{i} of shape {tuple(c.shape)} is not [{b.shape[1]}]"
    if a.shape[1] == 0:
        return "K == 0"
    big = [_mm._max_offset(t, 2) for t in (a, *bs)] + [a.shape[0] * b.shape[1] for b in bs]
    if max(big) > _mm._INT32_MAX:
        return "too large for 32-bit indexing"
    return None


def reference(a: torch.Tensor, bs, biases) -> list[torch.Tensor]:
    """ATen: one ``mm`` / ``addmm`` per group."""
    return [torch.mm(a, b) if c is None else torch.addmm(c, a, b) for b, c in zip(bs, biases)]


def _aten_into(outs, a, bs, biases) -> None:
    """The ATen baseline config: cuBLAS, one GEMM per group, into the results."""
    for o, b, c in zip(outs, bs, biases):
        if c is not None:
            _common.host_op(torch.addmm, c, a, b, out=o)
        else:
            _common.host_op(torch.mm, a, b, out=o)
        _common.launch_counts["aten_gemm"] += 1


def grouped_matmul(
    a: torch.Tensor, bs: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``[a @ b + bias for each group]`` in one launch (``biases``: one per group, None
    for none).  Raises ``KernelError`` when :func:`check` refuses the inputs."""
    bs, biases = list(bs), list(biases)
    reason = check(a, bs, biases)
    if reason:
        raise KernelError(kernel="grouped_mm", reason=reason)
    M, K = a.shape
    ns = [b.shape[1] for b in bs]
    outs = [_common.empty((M, n), a.dtype, a.device) for n in ns]
    if M == 0 or sum(ns) == 0:
        return outs
    pad = MAX_GROUPS - len(bs)
    flags = [int(c is not None) for c in biases] + [0] * pad
    has_bias = any(flags)
    b_args = bs + [bs[0]] * pad
    # (a group without a bias passes its B: the pointers share a dtype; never read)
    c_args = [b if c is None else c for b, c in zip(bs, biases)] + [bs[0]] * pad
    o_args = outs + [outs[0]] * pad
    n_args = ns + [0] * pad
    b_strides = [s for b in b_args for s in b.stride()]
    c_strides = [0 if c is None else c.stride(0) for c in biases] + [0] * pad
    precision = _mm._input_precision(a.dtype)
    n_total = sum(ns)

    def launch(cfg: autotune.Config) -> None:
        if cfg.get(autotune.EXTERN) is not None:
            _aten_into(outs, a, bs, biases)
            return
        bn = cfg["BLOCK_N"]
        tiles = _common.cdiv(M, cfg["BLOCK_M"]) * sum(_common.cdiv(n, bn) for n in ns)
        _common.launch(
            _grouped_mm_kernel,
            (tiles,),
            a,
            *b_args,
            *c_args,
            *o_args,
            M,
            K,
            *n_args,
            *a.stride(),
            *b_strides,
            *c_strides,
            *flags,
            HAS_BIAS=has_bias,
            INPUT_PRECISION=precision,
            EVEN_K=K % cfg["BLOCK_K"] == 0,
            **cfg.as_kwargs(),
        )

    bucket = autotune.bucket
    key = (
        a.dtype,
        bucket(M),
        tuple(bucket(n) for n in ns),
        bucket(K),
        tuple(flags),
        precision,
        a.stride(-1) == 1,
        tuple(b.stride(-1) == 1 for b in bs),
    )
    # one GEMM of all the groups' columns: its space and first guess
    configs, first = _mm.tuning_choices(
        _mm.config_space, _mm.heuristic_config, a.dtype, precision, M, n_total, K
    )
    if not interpret_mode():
        configs.append(_mm.ATEN_CONFIG)  # timed beside ours: never slower than cuBLAS
    cfg = autotune.select("grouped_mm", key, configs, first, launch, outputs=lambda: outs)
    launch(cfg)
    return outs


# --- custom op ------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::grouped_mm",
    mutates_args=(),
    schema="(Tensor a, Tensor[] bs, Tensor?[] biases) -> Tensor[]",
)
@plans.planned("tile::grouped_mm")
def grouped_mm_op(a, bs, biases):
    """``[a @ b + bias for each group]`` on one tile kernel (ATen when it cannot run)."""
    bs, biases = list(bs), list(biases)
    return _common.guarded_op(
        "grouped_mm",
        check(a, bs, biases),
        key=(a.dtype, len(bs), tuple(c is None for c in biases)),
        run=lambda: grouped_matmul(a, bs, biases),
        fallback=lambda: reference(a, bs, biases),
    )


@grouped_mm_op.register_fake
def _(a, bs, biases):
    return [a.new_empty((a.shape[0], b.shape[1])) for b in bs]


def _setup(ctx, inputs, output):
    a, bs, biases = inputs
    ctx.has_bias = [c is not None for c in biases]
    ctx.save_for_backward(a, *bs)


def _backward(ctx, grads):
    a, *bs = ctx.saved_tensors
    need_a, need_bs, need_c = ctx.needs_input_grad
    pairs = [(g, b) for g, b in zip(grads, bs) if g is not None]
    ga = sum(g @ b.t() for g, b in pairs) if need_a and pairs else None
    gbs = [None if g is None else a.t() @ g for g in grads] if need_bs else None
    if need_c:
        gcs = [g.sum(0) if g is not None and h else None for g, h in zip(grads, ctx.has_bias)]
    else:
        gcs = None
    return ga, gbs, gcs


torch.library.register_autograd("tile::grouped_mm", _backward, setup_context=_setup)


# --- compile-for-Hopper specs (tests) -------------------------------------------------


def sm90_specs() -> list[dict]:
    """One spec per (dtype, precision, config) of matmul's space: a linear's weights
    (``W.t()``, unit stride along K) with biases, ragged K; and, for the 2-byte dtypes,
    a training backward's weight gradients (``x^T @ dy_i``: ``a`` column-major, each B
    row-major, no bias; the widths divisible by 16, as the JIT specialises them: B's rows
    are then read 16 bytes at a time)."""
    ints = ("M", "K", "N0", "N1", "N2", "N3", "stride_am", "stride_ak")
    ints += ("s0k", "s0n", "s1k", "s1n", "s2k", "s2n", "s3k", "s3n", "c0n", "c1n", "c2n", "c3n")
    ints += ("h0", "h1", "h2", "h3")
    layouts = {
        "": (
            ("stride_ak", "s0k", "s1k", "s2k", "s3k", "c0n", "c1n", "c2n", "c3n"),
            ["M", "K", "stride_am", "s0n", "s1n", "s2n", "s3n"],
            True,
        ),
        "_wgrad": (
            ("stride_am", "s0n", "s1n", "s2n", "s3n", "c0n", "c1n", "c2n", "c3n"),
            ["M", "K", "N0", "N1", "N2", "N3", "stride_ak", "s0k", "s1k", "s2k", "s3k"],
            False,
        ),
    }
    specs = []
    for dtype, precision in _mm.SM90_VARIANTS:
        tname = _common.triton_dtype_name(dtype)
        ptrs = [f"{p}{g}_ptr" for p in ("b", "c", "o") for g in range(MAX_GROUPS)]
        for suffix, (unit, divisible, bias) in layouts.items():
            if suffix and dtype.itemsize != 2:
                continue
            sig = {n: "*" + tname for n in ("a_ptr", *ptrs)}
            sig.update({n: "i32" for n in ints if n not in unit})
            for cfg in _mm.config_space(dtype, precision):
                specs.append(
                    {
                        "name": f"grouped_mm_{tname}_{precision}_{_mm.config_label(cfg)}{suffix}",
                        "fn": _grouped_mm_kernel,
                        "signature": dict(sig),
                        "constexprs": {
                            **{u: 1 for u in unit},
                            "HAS_BIAS": bias,
                            "INPUT_PRECISION": precision,
                            "EVEN_K": False,
                            **dict(cfg.kwargs),
                        },
                        "divisible": divisible,
                        "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages,
                    }
                )
    return specs
