"""Batched GEMM with a fused epilogue: ``out = act(alpha * (A @ B) + beta * bias)``.

One Triton kernel (``_matmul_kernel``) serves mm / addmm / bmm / baddbmm and
linear + activation.  A and B are read through their strides, so transposed views
(``W.t()``, ``x.transpose(-1, -2)``) and slices cost no copy; the bias is read through
broadcast strides (0 on broadcast dims).  Accumulation is fp32, the output has the
input dtype.

Layout of this file (Triton tutorial 03 / Liger Kernel style):

* ``_matmul_kernel``: the kernel (grouped-M swizzle, masked ragged edges, EVEN_K path);
* ``config_space`` / ``heuristic_config`` / ``prune_configs``: what is tuned;
* ``check`` / ``matmul``: the host launcher (check, allocate, grid, launch);
* ``tile::mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / ``linear_act``: custom ops whose
  schemas mirror ATen's, with fake impls and autograd, each guarded by an ATen fallback;
* ``sm90_specs``: every (dtype, config) variant, for a compile-for-Hopper test.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from .._compat import interpret_mode
from ..exc import KernelError
from . import _common, autotune, plans

__all__ = [
    "ACTIVATIONS",
    "KERNEL_NAMES",
    "check",
    "config_space",
    "heuristic_config",
    "linear_act_check",
    "matmul",
    "prune_configs",
    "sm90_specs",
    "torch_activation",
]

#: Epilogue activations the kernel fuses (``ACTIVATION`` constexpr values).
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
#: Names under which launches are counted in ``_common.launch_counts``.
KERNEL_NAMES = ("mm", "addmm", "bmm", "baddbmm", "linear_act")

_MAX_GRID_Y = 65535  # CUDA limit of grid dim 1 (the batch axis); larger batches are split
_INT32_MAX = 2**31 - 1


# --- kernel --------------------------------------------------------------------------


@triton.jit
def _apply_activation(x, ACTIVATION: tl.constexpr):
    """Elementwise epilogue activation on an fp32 block (matches torch's definitions)."""
    if ACTIVATION == "relu":
        x = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN, like torch.relu
    elif ACTIVATION == "gelu":
        # 0.5 * x * (1 + erf(x / sqrt(2)))
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))); tanh(y) = 1 - 2 / (e^2y + 1)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    return x


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)``: program id -> output tile, grouped along M so that GROUP_M
    row-blocks of A stay in L2 while the tiles of one column-block of B are computed
    (tutorial 03).  Shared with the generated kernels of :mod:`.fused_matmul`."""
    return tile_coords(tl.program_id(axis=0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile number ``pid`` in :func:`grouped_tile`'s order
    (a persistent kernel walks the tile numbers itself)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def gemm_mainloop(
    a_ptr,  # [M, K] (already offset to this batch), any strides
    b_ptr,  # [K, N] (already offset to this batch), any strides
    offs_m,  # [BLOCK_M] rows of this tile
    offs_n,  # [BLOCK_N] columns of this tile
    mask_m,  # offs_m < M
    mask_n,  # offs_n < N
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``A @ B`` (masked edges, no epilogue).
    Shared with the generated kernels of :mod:`.fused_matmul`."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return gemm_mainloop_acc(
        acc,
        a_ptr,
        b_ptr,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        INPUT_PRECISION,
        EVEN_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )


@triton.jit
def gemm_mainloop_acc(
    acc,  # [BLOCK_M, BLOCK_N] fp32: what A @ B is added to
    a_ptr,  # [M, K], any strides
    b_ptr,  # [K, N], any strides
    offs_m,  # [BLOCK_M] rows of this tile
    offs_n,  # [BLOCK_N] columns of this tile
    mask_m,  # offs_m < M
    mask_n,  # offs_n < N
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc + A @ B`` for one tile: :func:`gemm_mainloop` from a given accumulator (a
    sum of GEMMs runs one after another into one accumulator)."""
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def b_descriptor(
    b_ptr,  # [K, N] (row-major), or W [N, K] row-major with B = W.t() when B_NK
    N,
    K,
    stride_bk,  # B's row stride (unless B_NK)
    stride_bn,  # W's row stride (B_NK)
    B_NK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The TMA descriptor :func:`tma_mainloop` reads a B operand through: ``[N, K]`` in
    ``[BLOCK_N, BLOCK_K]`` blocks for a linear's ``W.t()``, else ``[K, N]``."""
    if B_NK:
        return tl.make_tensor_descriptor(
            b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
    else:
        return tl.make_tensor_descriptor(
            b_ptr, shape=[K, N], strides=[stride_bk, 1], block_shape=[BLOCK_K, BLOCK_N]
        )


@triton.jit
def tma_mainloop(
    a_desc,  # [M, K] tensor descriptor, blocks [BLOCK_M, BLOCK_K]
    b_desc,  # [N, K] (B_NK: a weight W, B = W.t()) or [K, N] descriptor
    off_m,  # first row of this tile
    off_n,  # first column of this tile
    K,
    B_NK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`gemm_mainloop` through TMA descriptors (Hopper's tensor memory accelerator
    copies each tile to shared memory; rows and columns past the edges read as zero, so
    nothing is masked)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k])
        if B_NK:
            b = b_desc.load([off_n, k]).T
        else:
            b = b_desc.load([k, off_n])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _matmul_kernel(
    a_ptr,  # [BATCH, M, K], any strides
    b_ptr,  # [BATCH, K, N], any strides (a weight W [N, K] comes in as W.t())
    bias_ptr,  # [BATCH, M, N] through broadcast strides (0 on broadcast dims); unread if not HAS_BIAS
    out_ptr,  # [BATCH, M, N]
    M,  # rows of A and out
    N,  # columns of B and out
    K,  # reduction size
    stride_ab,  # A strides: batch, m, k
    stride_am,
    stride_ak,
    stride_bb,  # B strides: batch, k, n
    stride_bk,
    stride_bn,
    stride_cb,  # bias strides: batch, m, n (0 where the bias broadcasts)
    stride_cm,
    stride_cn,
    stride_ob,  # out strides: batch, m, n
    stride_om,
    stride_on,
    alpha,  # fp32 scale of A @ B
    beta,  # fp32 scale of the bias
    HAS_BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr,  # the bias is one row over N (stride_cm == 0), read as [BLOCK_N]
    ACTIVATION: tl.constexpr,  # one of ACTIVATIONS
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" (only matters for fp32 inputs)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_batch = tl.program_id(axis=1).to(tl.int64)  # 64-bit: batch * stride may pass 2**31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = gemm_mainloop(
        a_ptr + pid_batch * stride_ab,
        b_ptr + pid_batch * stride_bb,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        INPUT_PRECISION,
        EVEN_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )

    # Epilogue in fp32: scale, bias, activation; then cast to the output dtype.
    acc = acc * alpha
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias_ptr += pid_batch * stride_cb
        if BIAS_ROW:  # a [BLOCK_N] vector: a full tile would hold a second accumulator's registers
            bias = tl.load(bias_ptr + offs_n * stride_cn, mask=mask_n, other=0.0)[None, :]
        else:
            bias_ptrs = bias_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
            bias = tl.load(bias_ptrs, mask=mask, other=0.0)
        acc += beta * bias.to(tl.float32)
    acc = _apply_activation(acc, ACTIVATION)

    out_ptr += pid_batch * stride_ob
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- what is tuned -------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for H100 / H200.
# Tensor-core space, for 2-byte inputs; fp32 inputs with TF32 halve BLOCK_K (the same
# shared memory per stage: up to 144 KiB over 3 stages, under the 227 KiB of sm_90).
_SPACE_MMA = (
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 32, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (16, 64, 128, 1, 4, 4),  # skinny M (decode-like): no wasted rows
    (16, 64, 32, 1, 4, 4),  # skinny M with a short K (and the floor for tiny problems)
)
# Persistent TMA twins (``TMA=True``: :func:`tma_mainloop`, one program per SM), for the
# generated epilogue templates on Hopper with 2-byte inputs whose A and B are row-major
# up to a transpose.  A program holds its tile's epilogue state across the tile loop:
# compiled for sm_90, 128 x 256 and 4-warp 128 x 128 tiles spill, so they are not here.
_SPACE_TMA = (
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 8, 3),
    (128, 64, 64, 8, 8, 4),
    (64, 128, 64, 8, 8, 4),
)
# fp32 with input_precision="ieee" runs on FMA units: big tiles only add registers.
_SPACE_FMA = (
    (128, 128, 32, 8, 8, 3),
    (64, 64, 32, 8, 4, 3),
    (16, 64, 32, 1, 4, 3),
)


def config_space(
    dtype: torch.dtype = torch.float16, precision: str = "tf32"
) -> list[autotune.Config]:
    """Every config tried for ``dtype`` inputs at ``precision`` (before shape pruning)."""
    return configs_from(_SPACE_MMA, _SPACE_FMA, dtype, precision)


def configs_from(space_mma, space_fma, dtype: torch.dtype, precision: str) -> list[autotune.Config]:
    """Configs from ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)`` tables:
    ``space_fma`` for fp32 at ``"ieee"`` precision, else ``space_mma`` (BLOCK_K halved for
    4-byte inputs, the same shared memory per stage).  Shared by the GEMM templates."""
    return list(_configs_from(space_mma, space_fma, dtype, precision))


@functools.lru_cache(maxsize=256)
def _configs_from(space_mma, space_fma, dtype: torch.dtype, precision: str):
    if dtype == torch.float32 and precision == "ieee":
        space = space_fma
    elif dtype.itemsize >= 4:
        space = tuple((bm, bn, max(16, bk // 2), gm, w, s) for bm, bn, bk, gm, w, s in space_mma)
    else:
        space = space_mma
    return tuple(
        autotune.Config.make(
            num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm
        )
        for bm, bn, bk, gm, w, s in space
    )


def tma_configs(dtype: torch.dtype, space=_SPACE_TMA) -> list[autotune.Config]:
    """The persistent TMA configs (``TMA=True``) for ``dtype`` inputs (2-byte ones only)
    from a ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)`` table."""
    if dtype.itemsize != 2:
        return []
    return [
        autotune.Config.make(
            num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, TMA=True
        )
        for bm, bn, bk, gm, w, s in space
    ]


def _limit(n: int, smallest: int) -> int:
    return max(autotune.bucket(n), smallest)


def prune_configs(configs: list[autotune.Config], M: int, N: int, K: int) -> list[autotune.Config]:
    """Drop configs whose blocks are far beyond the problem (BLOCK_X > next_pow2(X)),
    keeping at least the smallest blocks of the space."""
    if not configs:
        return []
    lim_m = _limit(M, min(c["BLOCK_M"] for c in configs))
    lim_n = _limit(N, min(c["BLOCK_N"] for c in configs))
    lim_k = _limit(K, min(c["BLOCK_K"] for c in configs))
    kept = [
        c
        for c in configs
        if c["BLOCK_M"] <= lim_m and c["BLOCK_N"] <= lim_n and c["BLOCK_K"] <= lim_k
    ]
    if kept:
        return kept

    def overshoot(c):  # how far past the problem each block reaches, in powers of two
        return sum(
            max(0, c[b].bit_length() - lim.bit_length())
            for b, lim in (("BLOCK_M", lim_m), ("BLOCK_N", lim_n), ("BLOCK_K", lim_k))
        )

    return [min(configs, key=lambda c: (overshoot(c), c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"]))]


def tuning_choices(
    space: Callable[[torch.dtype, str], list[autotune.Config]],
    heuristic: Callable[..., autotune.Config],
    dtype: torch.dtype,
    precision: str,
    M: int,
    N: int,
    K: int,
) -> tuple[list[autotune.Config], autotune.Config]:
    """``(configs, first)``: a GEMM template's ``space`` pruned for ``M, N, K`` and its
    ``heuristic`` config.  Memoised: every launch asks, and the answer depends only on
    the arguments and the interpreter mode."""
    configs, first = _tuning_choices(space, heuristic, dtype, precision, M, N, K, interpret_mode())
    return list(configs), first


@functools.lru_cache(maxsize=4096)
def _tuning_choices(space, heuristic, dtype, precision, M, N, K, _interpret):
    configs = tuple(prune_configs(space(dtype, precision), M, N, K))
    return configs, heuristic(M, N, K, dtype, precision)


def heuristic_config(
    M: int, N: int, K: int, dtype: torch.dtype, precision: str = "tf32"
) -> autotune.Config:
    """The config used without tuning (interpreter, ``autotune="off"``, first guess)."""
    if interpret_mode():
        # Small blocks: the interpreter's cost is per program and per masked element.
        def blk(n: int, hi: int) -> int:
            return min(hi, max(16, autotune.bucket(n)))

        return autotune.Config.make(
            num_warps=4,
            num_stages=1,
            BLOCK_M=blk(M, 32),
            BLOCK_N=blk(N, 32),
            BLOCK_K=blk(K, 32),
            GROUP_M=8,
        )
    space = prune_configs(config_space(dtype, precision), M, N, K)
    if M <= 16:
        prefer = (16, 64)
    elif M <= 64:
        prefer = (64, 128) if N > 64 else (64, 64)
    elif N <= 64:
        prefer = (128, 64)
    else:
        prefer = (128, 128)
    for want in (prefer, (64, 64), (16, 64)):
        for c in space:
            if (c["BLOCK_M"], c["BLOCK_N"]) == want:
                return c
    return space[-1]


# --- host launcher -------------------------------------------------------------------


def torch_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The eager equivalent of the kernel's epilogue activation."""
    if activation == "none":
        return x
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _max_offset(t: torch.Tensor, dims: int) -> int:
    """Largest element offset within one matrix (the last ``dims`` dims) of ``t``."""
    return sum(
        (s - 1) * abs(st)
        for s, st in zip(t.shape[-dims:], t.stride()[-dims:], strict=True)
        if s > 0
    )


@_common.memo_reason
def check(a: Any, b: Any, bias: Any = None, activation: str = "none") -> str | None:
    """Why ``matmul(a, b, bias, activation=...)`` cannot run the tile kernel, or None.

    Accepted: a [M, K] @ b [K, N], a [B, M, K] @ b [B, K, N], or a [B, M, K] @ b [K, N]
    (b shared by the batch); same floating dtype (fp32/fp16/bf16) and device; a bias of
    that dtype broadcastable to the output.
    """
    tensors = {"a": a, "b": b} if bias is None else {"a": a, "b": b, "bias": bias}
    for name, t in tensors.items():
        r = _common.device_reason(t) or _common.dtype_reason(t) or _common.dot_reason(t)
        if r:
            return f"{name}: {r}"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not one of {ACTIVATIONS}"
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        return f"tensors are on different devices ({', '.join(sorted(map(str, devices)))})"
    if b.dtype != a.dtype:
        return f"mixed dtypes: a is {a.dtype}, b is {b.dtype}"
    if bias is not None and bias.dtype != a.dtype:
        return f"bias dtype {bias.dtype} differs from the inputs' {a.dtype}"
    if a.dim() not in (2, 3):
        return f"a has rank {a.dim()} (expects 2 or 3)"
    if b.dim() not in (2, 3) or b.dim() > a.dim():
        return f"b has rank {b.dim()} with a of rank {a.dim()} (expects 2/2, 3/3 or 3/2)"
    if a.shape[-1] != b.shape[-2]:
        return f"inner sizes differ: a {tuple(a.shape)} @ b {tuple(b.shape)}"
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]:
        return f"batch sizes differ: a {tuple(a.shape)}, b {tuple(b.shape)}"
    out_shape = (*a.shape[:-1], b.shape[-1])
    if bias is not None:
        if bias.dim() > len(out_shape):
            return f"bias of shape {tuple(bias.shape)} has more dims than the output {out_shape}"
        try:
            if tuple(_common.broadcast_shapes(bias.shape, out_shape)) != out_shape:
                raise RuntimeError
        except RuntimeError:
            return f"bias of shape {tuple(bias.shape)} does not broadcast to {out_shape}"
    for name, t in tensors.items():
        if _max_offset(t, 2) > _INT32_MAX:
            return f"{name} is too large for 32-bit indexing within one matrix"
    if math.prod(out_shape[-2:]) > _INT32_MAX:
        return "the output is too large for 32-bit indexing within one matrix"
    return None


#: The plain GEMM's baseline config: ATen (cuBLAS) instead of the tile kernel.  Timed with
#: the tile configs on a GPU (autotune.search times baselines first) and chosen only
#: when it measured faster; such a call also counts an ``"aten_gemm"`` launch.
ATEN_CONFIG = autotune.Config.make(num_warps=1, num_stages=1, **{autotune.EXTERN: "aten"})


def _aten_into(out, a, b, bias, alpha: float, beta: float) -> None:
    """``out = alpha * (a @ b) + beta * bias`` with ATen's addmm / baddbmm (``a`` and
    ``b`` of one rank; without a bias, ``out`` is passed as the ignored input)."""
    fn = torch.addmm if a.dim() == 2 else torch.baddbmm
    inp, beta = (bias, beta) if bias is not None else (out, 0.0)
    _common.host_op(fn, inp, a, b, beta=beta, alpha=alpha, out=out)
    _common.launch_counts["aten_gemm"] += 1


def _input_precision(dtype: torch.dtype) -> str:
    if interpret_mode():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if _common.tf32_allowed() else "ieee"
    return "tf32"  # ignored by Triton for 16-bit inputs


def _host_result(a, b, bias, alpha, beta, activation) -> torch.Tensor:
    """K == 0 or alpha == 0: A @ B does not contribute (BLAS semantics; torch agrees)."""
    shape = (*a.shape[:-1], b.shape[-1])
    out = _common.empty(shape, a.dtype, a.device)
    if bias is not None and beta != 0:
        val = bias.to(torch.float32) * beta
    else:
        val = torch.zeros((), dtype=torch.float32, device=a.device)
    out.copy_(torch_activation(val.expand(shape), activation))
    return out


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    activation: str = "none",
) -> torch.Tensor:
    """``act(alpha * (a @ b) + beta * bias)`` with the tile kernel.

    Semantics of ``torch.addmm(bias, a, b, beta=beta, alpha=alpha)`` for 2-D inputs and
    ``torch.baddbmm`` for 3-D ones (also a 3-D ``a`` with a 2-D ``b`` shared by the
    batch); with ``beta == 0`` the bias is not read (NaN in it does not propagate).
    Raises ``KernelError`` when ``check`` refuses the inputs.
    """
    reason = check(a, b, bias, activation)
    if reason:
        raise KernelError(kernel="matmul", reason=reason)
    alpha, beta = float(alpha), float(beta)
    batched = a.dim() == 3
    M, K = a.shape[-2], a.shape[-1]
    N = b.shape[-1]
    batch = a.shape[0] if batched else 1
    if M == 0 or N == 0 or batch == 0:
        return _common.empty((*a.shape[:-1], N), a.dtype, a.device)
    if K == 0 or alpha == 0.0:
        return _host_result(a, b, bias, alpha, beta, activation)

    out = _common.empty((*a.shape[:-1], N), a.dtype, a.device)
    # Everything is read as [BATCH, ., .]: a 2-D operand gets batch stride 0, as does a
    # shared b or a broadcast bias.  (Strides only: no views on the hot path.)
    a_st = a.stride() if batched else (0, *a.stride())
    b_st = b.stride() if b.dim() == 3 else (0, *b.stride())
    out_st = out.stride() if batched else (0, *out.stride())
    has_bias = bias is not None and beta != 0.0
    if has_bias:
        bias_st = bias.expand(out.shape).stride()
        bias_st = bias_st if batched else (0, *bias_st)
    else:
        bias_st = (0, 0, 0)  # never read (HAS_BIAS is False)
    bias_t = bias if has_bias else out
    bias_row = has_bias and bias_st[1] == 0  # one row over N: read as a vector

    precision = _input_precision(a.dtype)

    def launch(cfg: autotune.Config) -> None:
        if cfg.get(autotune.EXTERN) is not None:
            _aten_into(out, a, b, bias if has_bias else None, alpha, beta)
            return
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        tiles = _common.cdiv(M, bm) * _common.cdiv(N, bn)
        for start in range(0, batch, _MAX_GRID_Y):
            stop = min(batch, start + _MAX_GRID_Y)
            ptrs = (a, b, bias_t, out)
            if start:  # the chunk's first matrix, through the batch strides
                ptrs = tuple(
                    t.as_strided((1,), (1,), t.storage_offset() + start * st[0])
                    for t, st in zip(ptrs, (a_st, b_st, bias_st, out_st))
                )
            _common.launch(
                _matmul_kernel,
                (tiles, stop - start),
                *ptrs,
                M,
                N,
                K,
                *a_st,
                *b_st,
                *bias_st,
                *out_st,
                alpha,
                beta,
                HAS_BIAS=has_bias,
                BIAS_ROW=bias_row,
                ACTIVATION=activation,
                INPUT_PRECISION=precision,
                EVEN_K=K % bk == 0,
                **cfg.as_kwargs(),
            )

    bucket = autotune.bucket
    key = (
        a.dtype,
        bucket(M),
        bucket(N),
        bucket(K),
        batch > 1,
        has_bias,
        bias_row,
        activation,
        precision,
        a.stride(-1) == 1,  # A k-contiguous (else m-contiguous / strided)
        b.stride(-1) == 1,  # B n-contiguous (else k-contiguous, e.g. W.t())
    )
    configs, heuristic = tuning_choices(config_space, heuristic_config, a.dtype, precision, M, N, K)
    if activation == "none" and a.dim() == b.dim() and not interpret_mode():
        configs.append(ATEN_CONFIG)  # timed beside ours: never slower than cuBLAS
    cfg = autotune.select("matmul", key, configs, heuristic, launch, outputs=lambda: (out,))
    launch(cfg)
    return out


# --- custom ops ------------------------------------------------------------------------


def _define_mm(name: str, ndim: int):
    """``tile::mm`` / ``tile::bmm``: ``self @ mat2`` on the tile kernel (ATen when it cannot)."""
    aten = getattr(torch.ops.aten, name).default

    @torch.library.custom_op(
        f"tile::{name}", mutates_args=(), schema="(Tensor self, Tensor mat2) -> Tensor"
    )
    @plans.planned(f"tile::{name}")
    def op(self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
        reason = check(self, mat2) or (
            None if self.dim() == ndim == mat2.dim() else f"{name} needs {ndim}-D"
        )
        return _common.guarded_op(
            name,
            reason,
            (self.dtype,),
            lambda: matmul(self, mat2),
            lambda: aten(self, mat2),
        )

    @op.register_fake
    def _(self, mat2):
        return aten(self, mat2)

    return op


def _define_addmm(name: str, ndim: int, mat1: str, mat2: str):
    """``tile::addmm`` / ``tile::baddbmm``: ``beta * self + alpha * (mat1 @ mat2)``."""
    aten = getattr(torch.ops.aten, name).default

    @torch.library.custom_op(
        f"tile::{name}",
        mutates_args=(),
        schema=f"(Tensor self, Tensor {mat1}, Tensor {mat2}, float beta=1, float alpha=1) -> Tensor",
    )
    @plans.planned(f"tile::{name}")
    def op(
        self: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0, alpha: float = 1.0
    ) -> torch.Tensor:
        reason = check(a, b, self) or (
            None if a.dim() == ndim == b.dim() else f"{name} needs {ndim}-D"
        )
        return _common.guarded_op(
            name,
            reason,
            (a.dtype,),
            lambda: matmul(a, b, self, alpha=alpha, beta=beta),
            lambda: aten(self, a, b, beta=beta, alpha=alpha),
        )

    @op.register_fake
    def _(self, a, b, beta=1.0, alpha=1.0):
        return aten(self, a, b, beta=beta, alpha=alpha)

    return op


_mm = _define_mm("mm", 2)
_addmm = _define_addmm("addmm", 2, "mat1", "mat2")
_bmm = _define_mm("bmm", 3)
_baddbmm = _define_addmm("baddbmm", 3, "batch1", "batch2")


def linear_act_check(
    input: Any, weight: Any, bias: Any = None, activation: str = "none"
) -> str | None:
    """Why ``tile::linear_act`` cannot use the tile kernel for these inputs, or None."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
    if input.dim() < 1:
        return "input is 0-d"
    if weight.dim() != 2:
        return f"weight has rank {weight.dim()} (expects 2)"
    if input.shape[-1] != weight.shape[1]:
        return f"input {tuple(input.shape)} does not match weight {tuple(weight.shape)}"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        return f"bias of shape {tuple(bias.shape)} is not [{weight.shape[0]}]"
    tensors = {"input": input, "weight": weight}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        r = _common.device_reason(t) or _common.dtype_reason(t) or _common.dot_reason(t)
        if r:
            return f"{name}: {r}"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not one of {ACTIVATIONS}"
    if len({t.device for t in tensors.values()}) > 1:
        return "tensors are on different devices"
    if len({t.dtype for t in tensors.values()}) > 1:
        return "mixed dtypes: " + ", ".join(f"{k} {t.dtype}" for k, t in tensors.items())
    rows = math.prod(input.shape[:-1])
    if (
        _max_offset(input, input.dim()) > _INT32_MAX
        or _max_offset(weight, 2) > _INT32_MAX
        or rows * input.shape[-1] > _INT32_MAX
        or rows * weight.shape[0] > _INT32_MAX
    ):
        return "too large for 32-bit indexing"
    return None


def _linear_act_launch(input, weight, bias, activation) -> torch.Tensor:
    K = input.shape[-1]
    N = weight.shape[0]
    lead = input.shape[:-1]
    rows = math.prod(lead)
    try:
        x2 = input.view(rows, K)  # folds the leading dims without a copy when possible
    except RuntimeError:
        x2 = None
    if x2 is None and input.dim() == 3:
        # not foldable: batch over dim 0 with the weight shared (stride 0), still no copy
        return matmul(input, weight.t(), bias, activation=activation)
    if x2 is None:
        x2 = input.reshape(rows, K)
    return matmul(x2, weight.t(), bias, activation=activation).view(*lead, N)


@torch.library.custom_op(
    "tile::linear_act",
    mutates_args=(),
    schema="(Tensor input, Tensor weight, Tensor? bias, str activation) -> Tensor",
)
@plans.planned("tile::linear_act")
def _linear_act(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return _common.guarded_op(
        "linear_act",
        linear_act_check(input, weight, bias, activation),
        (input.dtype, bias is not None, activation),
        lambda: _linear_act_launch(input, weight, bias, activation),
        lambda: torch_activation(torch.nn.functional.linear(input, weight, bias), activation),
    )


@_linear_act.register_fake
def _(input, weight, bias, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return torch.nn.functional.linear(input, weight, bias)


# --- autograd ----------------------------------------------------------------------------


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t if s == 1 else t * s


def _setup_mm(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    ga = torch.ops.tile.mm(grad, b.t()) if ctx.needs_input_grad[0] else None
    gb = torch.ops.tile.mm(a.t(), grad) if ctx.needs_input_grad[1] else None
    return ga, gb


def _bmm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    ga = torch.ops.tile.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    gb = torch.ops.tile.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return ga, gb


def _setup_addmm(ctx, inputs, output):
    bias, m1, m2, *rest = inputs
    ctx.beta = float(rest[0]) if len(rest) > 0 else 1.0
    ctx.alpha = float(rest[1]) if len(rest) > 1 else 1.0
    ctx.bias_shape = bias.shape
    ctx.save_for_backward(m1, m2)


def _addmm_like_backward(ctx, grad, mm, transpose):
    m1, m2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    gbias = _scaled(grad, ctx.beta).sum_to_size(ctx.bias_shape) if need[0] else None
    g1 = _scaled(mm(grad, transpose(m2)), ctx.alpha) if need[1] else None
    g2 = _scaled(mm(transpose(m1), grad), ctx.alpha) if need[2] else None
    return gbias, g1, g2, None, None


def _addmm_backward(ctx, grad):
    return _addmm_like_backward(ctx, grad, torch.ops.tile.mm, lambda t: t.t())


def _baddbmm_backward(ctx, grad):
    return _addmm_like_backward(ctx, grad, torch.ops.tile.bmm, lambda t: t.transpose(1, 2))


def _setup_linear_act(ctx, inputs, output):
    x, w, bias, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w, bias)


def _activation_backward(grad, z, activation):
    """d act(z) / dz applied to ``grad`` (eager ATen backward ops)."""
    if activation == "none":
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward.default(grad, z, 0)
    if activation in ("gelu", "gelu_tanh"):
        approx = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward.default(grad, z, approximate=approx)
    if activation == "silu":
        return torch.ops.aten.silu_backward.default(grad, z)
    raise ValueError(f"unknown activation {activation!r}")


def _linear_act_backward(ctx, grad):
    x, w, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    if ctx.activation == "none":
        dz = grad
    else:  # recompute the pre-activation with the tile kernel
        z = torch.ops.tile.linear_act(x, w, bias, "none")
        dz = _activation_backward(grad, z, ctx.activation)
    n, k = w.shape
    dz2 = dz.reshape(-1, n)
    gx = torch.ops.tile.mm(dz2, w).view(x.shape) if need[0] else None
    gw = torch.ops.tile.mm(dz2.t(), x.reshape(-1, k)) if need[1] else None
    gb = dz2.sum(0).sum_to_size(bias.shape) if ctx.has_bias and need[2] else None
    return gx, gw, gb, None


torch.library.register_autograd("tile::mm", _mm_backward, setup_context=_setup_mm)
torch.library.register_autograd("tile::bmm", _bmm_backward, setup_context=_setup_mm)
torch.library.register_autograd("tile::addmm", _addmm_backward, setup_context=_setup_addmm)
torch.library.register_autograd("tile::baddbmm", _baddbmm_backward, setup_context=_setup_addmm)
torch.library.register_autograd(
    "tile::linear_act", _linear_act_backward, setup_context=_setup_linear_act
)


# --- compile-for-Hopper specs (tests) -------------------------------------------------

_INT_ARGS = (
    "M",
    "N",
    "K",
    "stride_ab",
    "stride_am",
    "stride_ak",
    "stride_bb",
    "stride_bk",
    "stride_bn",
    "stride_cb",
    "stride_cm",
    "stride_cn",
    "stride_ob",
    "stride_om",
    "stride_on",
)


#: (dtype, input precision) pairs compiled by the sm_90 specs (here and in fused_matmul).
SM90_VARIANTS = (
    (torch.float16, "tf32"),
    (torch.bfloat16, "tf32"),
    (torch.float32, "tf32"),
    (torch.float32, "ieee"),
)


def config_label(cfg: autotune.Config) -> str:
    """A config as the sm_90 spec names write it: ``128x128x64_g8_w8_s4``, then ``_tma``
    for a persistent TMA config and ``_split`` for a split epilogue (``EPI_SPLIT``)."""
    return (
        f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
        f"_g{cfg['GROUP_M']}_w{cfg.num_warps}_s{cfg.num_stages}"
        + ("_tma" if cfg.get("TMA") else "")
        + ("_split" if cfg.get("EPI_SPLIT") else "")
    )


def sm90_specs() -> list[dict]:
    """One compile spec per (dtype, input precision, config) of the tuning space.

    Each is ``{"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}`` for
    ``_common.compile_for_target``: row-major operands (unit strides are constexpr, as
    Triton's JIT specialises an int argument equal to 1), with a bias and ragged K.
    """
    unit = ("stride_ak", "stride_bn", "stride_cn", "stride_on")
    specs = []
    for dtype, precision in SM90_VARIANTS:
        tname = _common.triton_dtype_name(dtype)
        ptr = "*" + tname
        signature = {"a_ptr": ptr, "b_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr}
        signature.update({name: "i32" for name in _INT_ARGS if name not in unit})
        signature.update({"alpha": "fp32", "beta": "fp32"})
        for cfg in config_space(dtype, precision):
            constexprs = {
                **{name: 1 for name in unit},
                "HAS_BIAS": True,
                # a linear's bias (one row) in half precision; a full [M, N] one in fp32
                "BIAS_ROW": dtype != torch.float32,
                "ACTIVATION": "none",
                "INPUT_PRECISION": precision,
                "EVEN_K": False,
                **dict(cfg.kwargs),
            }
            name = f"matmul_{tname}_{precision}_{config_label(cfg)}"
            specs.append(
                {
                    "name": name,
                    "fn": _matmul_kernel,
                    "signature": dict(signature),
                    "constexprs": constexprs,
                    # leading strides of aligned row-major operands are multiples of 16
                    "divisible": [
                        n
                        for n in (  # the JIT hints every int divisible by 16
                            "M",
                            "N",
                            "K",
                            "stride_ab",
                            "stride_am",
                            "stride_bb",
                            "stride_bk",
                            "stride_cm",
                            "stride_om",
                        )
                        if n in signature
                    ],
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                }
            )
    return specs
