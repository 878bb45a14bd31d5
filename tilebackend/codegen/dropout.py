"""A dropout's keep mask as a pointwise op, so a dropout after a GEMM fuses into its
epilogue.

``tile::dropout_keep(x, seed, p)`` is ``rand(seed, i) > p`` for the element at flat index
``i`` of ``x`` (contiguous order): Philox keyed by a one-element int64 ``seed`` and the
index, as Inductor's ``inductor_random`` and :mod:`.fused_softmax`'s dropout draw it.
``x`` only gives the shape and device.  The fusion pass (``fx_passes/fusion_dropout.py``)
writes ``native_dropout(x, p)`` as ``x * keep * (1 / (1 - p))`` with this ``keep``; the
GEMM-epilogue kernels print ``keep`` as ``tl.rand(seed, flat index) > p`` (the node
``("gt", ("rand", seed), p)`` of :mod:`.pointwise`), so the fused kernel and this op's
own kernel draw the same numbers.

The op's own kernel runs only where a keep mask was not fused but the output it masks
was; elsewhere the pass puts the graph's original dropout back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common, pointwise

__all__ = ["KERNEL_NAMES", "check", "dropout_keep", "reference"]

KERNEL_NAMES = ("dropout_keep",)
_BLOCK = 1024


@triton.jit
def dropout_keep_kernel(
    seed_ptr,  # *i64 [1]: the Philox seed
    keep_ptr,  # *u8 [n]: out, 1 where rand(seed, i) > p
    n,  # number of elements
    p,  # drop probability, in (0, 1)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    keep = tl.rand(seed, offs) > p
    tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=offs < n)


@_common.memo_reason
def check(x, seed, p) -> str | None:
    """Why the kernel cannot make this keep mask, or None."""
    r = _common.device_reason(x)
    if r:
        return f"x: {r}"
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        return "seed is not a one-element int64 tensor"
    if seed.device != x.device:
        return f"seed on {seed.device}, x on {x.device}"
    if not 0.0 <= p <= 1.0:
        return f"p={p} is not in [0, 1]"
    if x.numel() > 2**31 - 1:
        return "too large for 32-bit indexing"
    return None


def reference(x, seed, p) -> torch.Tensor:
    """Eager: the same distribution from a CPU generator seeded with ``seed``, the numbers
    :func:`.pointwise.evaluate` gives ``rand`` (another stream than the kernels')."""
    return pointwise.uniform_reference(seed, x.shape, x.device) > p


def dropout_keep(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask (bool, ``x``'s shape, contiguous) with the tile kernel."""
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    n = keep.numel()
    if n:
        grid = (_common.cdiv(n, _BLOCK),)
        _common.launch(
            dropout_keep_kernel, grid, seed.reshape(1), keep.view(torch.uint8), n, p, BLOCK=_BLOCK
        )
    return keep


@torch.library.custom_op(
    "tile::dropout_keep", mutates_args=(), schema="(Tensor x, Tensor seed, float p) -> Tensor"
)
def dropout_keep_op(x, seed, p):
    """``rand(seed, i) > p`` over ``x``'s elements (bool; eager when the kernel cannot run)."""
    return _common.guarded_op(
        "dropout_keep",
        check(x, seed, p),
        key=(x.device.type,),
        run=lambda: dropout_keep(x, seed, p),
        fallback=lambda: reference(x, seed, p),
    )


@dropout_keep_op.register_fake
def _(x, seed, p):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


# --- compile-for-Hopper specs (tests) -------------------------------------------------


def sm90_specs() -> list[dict]:
    """This op's kernel, and the multi-output GEMM epilogue with a dropout (the output
    over a float extra ``IN0`` and its keep mask from the int64 seed ``IN1``) on the
    largest tile of each of matmul's sm_90 variants."""
    from . import fused_matmul, fused_matmul_multi

    specs = [
        {
            "name": "dropout_keep",
            "fn": dropout_keep_kernel,
            "signature": {"seed_ptr": "*i64", "keep_ptr": "*u8", "n": "i32", "p": "fp32"},
            "constexprs": {"BLOCK": _BLOCK},
            "num_warps": 4,
            "num_stages": 1,
        }
    ]
    keep = ("gt", ("rand", "IN1"), 0.1)
    exprs = [("add", ("mul", ("mul", "ACC", keep), 1.0 / 0.9), "IN0"), keep]
    fn = fused_matmul_multi.kernel_for(exprs, (False, False))
    largest = {}
    for spec in fused_matmul.epilogue_specs("mm_epilogue_dropout", fn, (("out1_ptr", True),)):
        variant = spec["name"].split("_")[3:5]  # dtype, precision
        area = spec["constexprs"]["BLOCK_M"] * spec["constexprs"]["BLOCK_N"]
        if area > largest.get(tuple(variant), (0, None))[0]:
            largest[tuple(variant)] = (area, spec)
    for _, spec in largest.values():
        spec["signature"]["in1_ptr"] = "*i64"
        specs.append(spec)
    return specs
