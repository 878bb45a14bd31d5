"""Dual GEMM with a generated pointwise epilogue:
``out = EXPR(ACC = A @ B0 + bias0, ACC1 = A @ B1 + bias1, IN0, IN1, ...)``.

Llama's SwiGLU MLP computes ``silu(x @ W1) * (x @ W3)``: two GEMMs over the same ``x``
whose results only meet in a pointwise expression.  ``tile::dual_mm_epilogue`` does it in
one launch: each program loads its ``A`` tile once per K step and runs two fp32
accumulators (``acc0 = A @ B0``, ``acc1 = A @ B1``), then adds the biases, evaluates the
expression (the format of :mod:`.pointwise`, ``ACC`` and ``ACC1`` being the two
accumulators) and stores once; neither GEMM result is written to memory.  The fusion pass
(``fx_passes/fusion.py``) builds the call when two GEMMs share ``a`` and their results
are used only by one pointwise region.

The kernel is generated like :mod:`.fused_matmul`'s (same source cache, same extra-input
loads and expression printer); the main loop is :func:`dual_gemm_mainloop` below, or on
Hopper the persistent :func:`tma_dual_mainloop` (``TMA=True`` configs, offered when TMA
can read ``a`` and both weights one way).  Two
accumulators double the registers of a tile and ``B`` costs two tiles of shared memory per
stage, so the tuning space is smaller than :mod:`.matmul`'s (128 x 64 or 64 x 128 tiles at most).

Shapes: ``a`` is ``[*, K]`` (leading dims folded into ``M`` rows), ``b0`` and ``b1`` are
``[K, N]`` with one dtype (any strides: a weight ``W [N, K]`` comes as ``W.t()``), each
bias broadcasts to ``[M, N]`` (``[N]`` or ``[M, N]``), each extra broadcasts to the output
``[*, N]`` (read through two row strides, as in :mod:`.fused_matmul`).
"""

from __future__ import annotations

import textwrap
from typing import Any

import torch
import triton
import triton.language as tl

from .._compat import interpret_mode
from ..exc import KernelError
from . import _common, autotune, fused_matmul, plans, pointwise
from . import epilogue_host as _host
from . import matmul as _mm

__all__ = [
    "KERNEL_NAMES",
    "check",
    "config_space",
    "dual_gemm_mainloop",
    "dual_matmul_epilogue",
    "heuristic_config",
    "kernel_for",
    "reference",
    "sm90_specs",
]

KERNEL_NAMES = ("dual_mm_epilogue",)
_ACCS = ("ACC", "ACC1")

# --- the main loop ----------------------------------------------------------------------


@triton.jit
def dual_gemm_mainloop(
    a_ptr,  # [M, K], any strides
    b0_ptr,  # [K, N], any strides
    b1_ptr,  # [K, N], any strides
    offs_m,  # [BLOCK_M] rows of this tile
    offs_n,  # [BLOCK_N] columns of this tile
    mask_m,  # offs_m < M
    mask_n,  # offs_n < N
    K,
    stride_am,
    stride_ak,
    stride_b0k,
    stride_b0n,
    stride_b1k,
    stride_b1n,
    INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 ``[BLOCK_M, BLOCK_N]`` tiles of ``A @ B0`` and ``A @ B1``: one load of the
    ``A`` tile per K step feeds both dots (masked edges, no epilogue)."""
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    # [BLOCK_M, BLOCK_K] and two [BLOCK_K, BLOCK_N] tiles of pointers
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b0_ptrs = b0_ptr + offs_k[:, None] * stride_b0k + offs_n[None, :] * stride_b0n
    b1_ptrs = b1_ptr + offs_k[:, None] * stride_b1k + offs_n[None, :] * stride_b1n
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b0 = tl.load(b0_ptrs, mask=mask_n[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            mask_b = (offs_k[:, None] < k_left) & mask_n[None, :]
            b0 = tl.load(b0_ptrs, mask=mask_b, other=0.0)
            b1 = tl.load(b1_ptrs, mask=mask_b, other=0.0)
        acc0 = tl.dot(a, b0, acc0, input_precision=INPUT_PRECISION)
        acc1 = tl.dot(a, b1, acc1, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b0_ptrs += BLOCK_K * stride_b0k
        b1_ptrs += BLOCK_K * stride_b1k
    return acc0, acc1


@triton.jit
def tma_dual_mainloop(
    a_desc,  # [M, K] tensor descriptor, blocks [BLOCK_M, BLOCK_K]
    b0_desc,  # [N, K] (B_NK: B0 = W0.t()) or [K, N] descriptor
    b1_desc,  # the same for B1
    off_m,  # first row of this tile
    off_n,  # first column of this tile
    K,
    B_NK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`dual_gemm_mainloop` through TMA descriptors (edges read as zero)."""
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k])
        if B_NK:
            b0 = b0_desc.load([off_n, k]).T
            b1 = b1_desc.load([off_n, k]).T
        else:
            b0 = b0_desc.load([k, off_n])
            b1 = b1_desc.load([k, off_n])
        acc0 = tl.dot(a, b0, acc0, input_precision=INPUT_PRECISION)
        acc1 = tl.dot(a, b1, acc1, input_precision=INPUT_PRECISION)
    return acc0, acc1


# --- the template -------------------------------------------------------------------

_TEMPLATE = '''\
"""Generated by tilebackend.codegen.dual_matmul: dual GEMM + pointwise epilogue.

expr: {expr}
bool inputs: {bools}
leaf dtypes: {dtypes}
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice  # noqa: F401  (used by some expressions)

from tilebackend.codegen.dual_matmul import dual_gemm_mainloop, tma_dual_mainloop
from tilebackend.codegen.matmul import b_descriptor, grouped_tile, tile_coords


@triton.jit
def dual_mm_epilogue_kernel(
    a_ptr,  # [M, K], any strides: each tile is loaded once for both GEMMs
    b0_ptr,  # [K, N], any strides: ACC = A @ B0
    b1_ptr,  # [K, N], any strides: ACC1 = A @ B1
    bias0_ptr,  # [M, N] through broadcast strides; unread unless HAS_BIAS0
    bias1_ptr,  # [M, N] through broadcast strides; unread unless HAS_BIAS1
    out_ptr,  # [M, N], row stride stride_om, column stride stride_on
{in_ptrs}    M,
    N,
    K,
    L1,  # rows of M are (i0, i1) with i1 < L1: extras' rows are i0 * s0 + i1 * s1
    stride_am,
    stride_ak,
    stride_b0k,
    stride_b0n,
    stride_b1k,
    stride_b1n,
    stride_c0m,  # bias0 strides (0 where it broadcasts)
    stride_c0n,
    stride_c1m,  # bias1 strides (0 where it broadcasts)
    stride_c1n,
    stride_om,
    stride_on,
{in_strides}    HAS_BIAS0: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    BIAS0_ROW: tl.constexpr,  # bias0 is one row over N (stride_c0m == 0)
    BIAS1_ROW: tl.constexpr,
{in_modes}    INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TMA: tl.constexpr,  # persistent: A, B0 and B1 through TMA descriptors (Hopper and later)
    B_NK: tl.constexpr,  # (TMA) B0 and B1 are W.t() of row-major weights [N, K]
):
    if TMA:  # each program walks the tiles num_programs apart
        a_desc = tl.make_tensor_descriptor(
            a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
        b0_desc = b_descriptor(b0_ptr, N, K, stride_b0k, stride_b0n, B_NK, BLOCK_N, BLOCK_K)
        b1_desc = b_descriptor(b1_ptr, N, K, stride_b1k, stride_b1n, B_NK, BLOCK_N, BLOCK_K)
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0), flatten=True):
            pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc0, acc1 = tma_dual_mainloop(
                a_desc, b0_desc, b1_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K,
                B_NK, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
{tma_epilogue}
    else:
        pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc0, acc1 = dual_gemm_mainloop(
            a_ptr, b0_ptr, b1_ptr, offs_m, offs_n, offs_m < M, offs_n < N, K,
            stride_am, stride_ak, stride_b0k, stride_b0n, stride_b1k, stride_b1n,
            INPUT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
        )
{epilogue}'''

#: The tile's epilogue (at the kernel body's indentation; placed in both main loops).
_EPILOGUE = """\
mask_m = offs_m < M
mask_n = offs_n < N
mask = mask_m[:, None] & mask_n[None, :]
{biases}m_base = 0  # (the first row: a batched template's is its batch's)
row0 = (offs_m // L1).to(tl.int64)
row1 = (offs_m % L1).to(tl.int64)
cols = offs_n.to(tl.int64)
{loads}
# --- the expression (fp32) ---
{body}
out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
tl.store(out_ptrs, {result}.to(out_ptr.dtype.element_ty), mask=mask)
"""


def _render(expr: Any, bools: tuple[bool, ...], leaf_dtypes=None) -> str:
    """The module source of the kernel for ``expr`` with extras (``True`` = bool extra)."""
    in_ptrs, in_strides, in_modes, loads, leaves, bool_leaves = fused_matmul._render_extras(
        expr, bools
    )
    biases = "".join(
        fused_matmul.render_bias(
            f"acc{i}",
            f"bias{i}_ptr",
            f"stride_c{i}m",
            f"stride_c{i}n",
            f"HAS_BIAS{i}",
            f"BIAS{i}_ROW",
            "",
        )
        for i in (0, 1)
    )
    body, (res,) = fused_matmul._render_expressions(
        [expr],
        {"ACC": "acc0", "ACC1": "acc1", **leaves},
        bool_leaves,
        leaf_dtypes,
        ind="",
        tile="acc0",
    )
    epilogue = _EPILOGUE.format(biases=biases, loads=loads, body=body, result=res)
    return _TEMPLATE.format(
        expr=pointwise.dumps(expr),
        bools=list(bools),
        dtypes={k: str(v) for k, v in (leaf_dtypes or {}).items()},
        in_ptrs=in_ptrs,
        in_strides=in_strides,
        in_modes=in_modes,
        tma_epilogue=textwrap.indent(epilogue, " " * 12),
        epilogue=textwrap.indent(epilogue, " " * 8),
    )


def kernel_for(expr: Any, bools: tuple[bool, ...] = (), leaf_dtypes=None):
    """The ``@triton.jit`` kernel for ``expr`` (a node or its string) with these extras;
    its source is written and cached as :mod:`.fused_matmul`'s are."""
    return fused_matmul.generated_kernel("dual_mm_epilogue", _render, expr, bools, leaf_dtypes)


# --- what is tuned -------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for H100 / H200, 2-byte
# inputs; fp32 with TF32 halves BLOCK_K.  Two fp32 accumulators: every config keeps them
# within 64 registers a thread (BLOCK_M * BLOCK_N * 2 <= 64 * 32 * num_warps), so a
# 128 x 64 dual tile does the MMA work of matmul's 128 x 128 per A tile loaded; compiled
# for sm_90, 128 x 128 spills at 8 warps.  Shared memory per stage is one A tile and two
# B tiles: 64x128x64 fp16 is (8 + 2 * 16) KiB, 160 KiB over 4 stages.
_SPACE_MMA = (
    (128, 64, 64, 8, 8, 3),
    (128, 64, 64, 8, 8, 4),
    (64, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 8, 4),
    (64, 64, 64, 8, 4, 4),
    (16, 64, 128, 1, 4, 3),  # skinny M (decode-like)
    (16, 64, 32, 1, 4, 4),  # skinny M with a short K (and the floor for tiny problems)
)
# fp32 with input_precision="ieee" runs on FMA units: small tiles.
_SPACE_FMA = (
    (128, 64, 32, 8, 8, 3),
    (64, 64, 32, 8, 4, 3),
    (16, 64, 32, 1, 4, 3),
)


# Persistent TMA twins of the 8-warp tiles (:func:`tma_dual_mainloop`), on Hopper for
# fp16/bf16 operands TMA can read (see ``epilogue_host.tma_layout``).
_SPACE_TMA = (
    (128, 64, 64, 8, 8, 3),
    (128, 64, 64, 8, 8, 4),
    (64, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 8, 4),
)


def config_space(
    dtype: torch.dtype = torch.float16, precision: str = "tf32"
) -> list[autotune.Config]:
    """Every config tried for ``dtype`` inputs at ``precision`` (before shape pruning)."""
    return _mm.configs_from(_SPACE_MMA, _SPACE_FMA, dtype, precision)


def tma_configs(dtype: torch.dtype) -> list[autotune.Config]:
    """The persistent TMA configs (``TMA=True``) for ``dtype`` inputs (2-byte ones only)."""
    return _mm.tma_configs(dtype, _SPACE_TMA)


def heuristic_config(
    M: int, N: int, K: int, dtype: torch.dtype, precision: str = "tf32"
) -> autotune.Config:
    """The config used without tuning (interpreter, ``autotune="off"``, first guess)."""
    if interpret_mode():  # matmul's small interpreter blocks
        return _mm.heuristic_config(M, N, K, dtype, precision)
    space = _mm.prune_configs(config_space(dtype, precision), M, N, K)
    if M <= 16:
        prefer = (16, 64)
    elif M <= 64:
        prefer = (64, 128) if N > 64 else (64, 64)
    else:
        prefer = (128, 64)
    for want in (prefer, (64, 64), (16, 64)):
        for c in space:
            if (c["BLOCK_M"], c["BLOCK_N"]) == want:
                return c
    return space[-1]


# --- host -----------------------------------------------------------------------------


def _parse(expr: Any) -> Any:
    return pointwise.loads(expr) if isinstance(expr, str) else pointwise.canonical(expr)


def _leaf_dtypes(a, extras) -> dict[str, torch.dtype]:
    return _host.leaf_dtypes(a, extras, _ACCS)


@_common.memo_reason
def check(a: Any, b0: Any, b1: Any, bias0: Any, bias1: Any, extras: Any, expr: Any) -> str | None:
    """Why ``dual_matmul_epilogue`` cannot run the tile kernel for these inputs, or None."""
    try:
        e = _parse(expr)
    except pointwise.ExprError as err:
        return f"expression: {err}"
    bs, biases = {"b0": b0, "b1": b1}, {"bias0": bias0, "bias1": bias1}
    return _host.check_operands(a, bs, biases, list(extras), [e], _ACCS)


def reference(a, b0, b1, bias0, bias1, extras, expr) -> torch.Tensor:
    """Eager: both GEMMs (``matmul`` + bias) in the input dtype, then the expression."""
    e = _parse(expr)
    extras = list(extras)
    accs = []
    for b, bias in ((b0, bias0), (b1, bias1)):
        acc = torch.matmul(a, b)
        accs.append(acc if bias is None else acc + bias)
    leaves = {"ACC": accs[0], "ACC1": accs[1], **{f"IN{i}": t for i, t in enumerate(extras)}}
    shape = _host.out_shape(a, b0, extras)
    out = pointwise.evaluate(e, leaves, shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        out = torch.as_tensor(out, device=a.device).expand(shape)
    if any(out is t for t in extras):  # EXPR = INk: a custom op must not alias an input
        out = out.clone()
    return out.contiguous()


def dual_matmul_epilogue(
    a: torch.Tensor,
    b0: torch.Tensor,
    b1: torch.Tensor,
    bias0: torch.Tensor | None,
    bias1: torch.Tensor | None,
    extra_inputs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    expr: Any,
) -> torch.Tensor:
    """``EXPR(ACC = a @ b0 + bias0, ACC1 = a @ b1 + bias1, *extra_inputs)`` in one launch.

    ``expr`` is a :mod:`.pointwise` expression (or its string).  The result has
    ``a.shape[:-1] + (N,)`` and the expression's dtype, contiguous.  Raises
    ``KernelError`` when :func:`check` refuses the inputs.
    """
    extras = list(extra_inputs)
    reason = check(a, b0, b1, bias0, bias1, extras, expr)
    if reason:
        raise KernelError(kernel="dual_mm_epilogue", reason=reason)
    e = _parse(expr)
    (out,) = _host.launch(
        "dual_mm_epilogue",
        lambda bools, dts: kernel_for(e, bools, dts),
        a,
        [b0, b1],
        [bias0, bias1],
        extras,
        [e],
        accs=_ACCS,
        space=config_space,
        heuristic=heuristic_config,
        jit_fns=(dual_gemm_mainloop, tma_dual_mainloop),
        tma_space=tma_configs,
    )
    return out


# --- custom op ------------------------------------------------------------------------


@torch.library.custom_op(
    "tile::dual_mm_epilogue",
    mutates_args=(),
    schema=(
        "(Tensor a, Tensor b0, Tensor b1, Tensor? bias0, Tensor? bias1, Tensor[] extras, "
        "str expr) -> Tensor"
    ),
)
@plans.planned("tile::dual_mm_epilogue")
def dual_mm_epilogue_op(a, b0, b1, bias0, bias1, extras, expr):
    """``EXPR(a @ b0 + bias0, a @ b1 + bias1, *extras)`` on one generated tile kernel
    (eager when it cannot run)."""
    extras = list(extras)
    return _common.guarded_op(
        "dual_mm_epilogue",
        check(a, b0, b1, bias0, bias1, extras, expr),
        key=(a.dtype, bias0 is not None, bias1 is not None, tuple(t.dtype for t in extras), expr),
        run=lambda: dual_matmul_epilogue(a, b0, b1, bias0, bias1, extras, expr),
        fallback=lambda: reference(a, b0, b1, bias0, bias1, extras, expr),
    )


@dual_mm_epilogue_op.register_fake
def _(a, b0, b1, bias0, bias1, extras, expr):
    extras = list(extras)
    dtype = pointwise.infer_dtype(pointwise.loads(expr), _leaf_dtypes(a, extras))
    return a.new_empty(_host.out_shape(a, b0, extras), dtype=dtype)


def _setup(ctx, inputs, output):
    a, b0, b1, bias0, bias1, extras, expr = inputs
    ctx.args = (expr,)
    ctx.save_for_backward(a, b0, b1, bias0, bias1, *extras)


def _backward(ctx, grad):
    """Recompute the forward with eager ops under autograd and differentiate it (the
    fused op only runs in graphs whose autograd is done: this is for direct calls)."""
    return tuple(_host.recompute_backward(ctx, [grad], reference, 5))


torch.library.register_autograd("tile::dual_mm_epilogue", _backward, setup_context=_setup)


# --- compile-for-Hopper specs (tests) -------------------------------------------------

#: What the sm_90 specs compile: SwiGLU, ``silu(x @ W1 + b1) * (x @ W3 + b3)``.
SPEC_EXPR = ("mul", ("silu", "ACC"), "ACC1")


def sm90_specs() -> list[dict]:
    """One spec per (dtype, precision, config) of this file's space for :data:`SPEC_EXPR`
    (row-major operands, both biases, ragged K), and one per persistent TMA config (2-byte
    dtypes, the linears' ``W.t()``)."""
    ints = (
        "M",
        "N",
        "K",
        "L1",
        "stride_am",
        "stride_ak",
        "stride_b0k",
        "stride_b0n",
        "stride_b1k",
        "stride_b1n",
        "stride_c0m",
        "stride_c0n",
        "stride_c1m",
        "stride_c1n",
        "stride_om",
        "stride_on",
    )
    fn = kernel_for(SPEC_EXPR)
    specs = []
    for dtype, precision in _mm.SM90_VARIANTS:
        tname = _common.triton_dtype_name(dtype)
        ptr = "*" + tname
        configs = [(c, False) for c in config_space(dtype, precision)]
        if precision == "tf32":  # (the 2-byte dtypes' one variant)
            configs += [(c, True) for c in tma_configs(dtype)]
        for cfg, tma in configs:
            # row-major B0 and B1, or (TMA) the linears' W0.t() and W1.t()
            unit = ("stride_ak", "stride_b0k" if tma else "stride_b0n")
            unit += ("stride_b1k" if tma else "stride_b1n", "stride_c0n", "stride_c1n", "stride_on")
            sig = {n: ptr for n in ("a_ptr", "b0_ptr", "b1_ptr", "bias0_ptr", "bias1_ptr")}
            sig["out_ptr"] = ptr
            sig.update({n: "i32" for n in ints if n not in unit})
            b_rows = ["stride_b0n", "stride_b1n"] if tma else ["stride_b0k", "stride_b1k"]
            name = f"dual_mm_epilogue_{tname}_{precision}_{_mm.config_label(cfg)}"
            specs.append(
                {
                    "name": name,
                    "fn": fn,
                    "signature": dict(sig),
                    "constexprs": {
                        **{u: 1 for u in unit},
                        "HAS_BIAS0": True,
                        "HAS_BIAS1": True,
                        # linear biases (one row) in half precision, full ones in fp32
                        "BIAS0_ROW": dtype != torch.float32,
                        "BIAS1_ROW": dtype != torch.float32,
                        "INPUT_PRECISION": precision,
                        "EVEN_K": False,
                        "TMA": False,
                        "B_NK": tma,
                        **dict(cfg.kwargs),
                    },
                    "divisible": ["M", "N", "K", "stride_am", *b_rows, "stride_om"],
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                }
            )
    return specs
