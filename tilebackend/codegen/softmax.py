"""Softmax and log-softmax, forward and backward, as Triton kernels (fp32 / fp16 / bf16 in,
math in fp32), their host launchers, and the ``tile::`` custom ops that mirror ATen's
``_softmax`` / ``_log_softmax`` / ``_softmax_backward_data`` / ``_log_softmax_backward_data``.

Layout.  Every kernel works on a logical ``[ROWS, N]`` view where ``N`` is the softmax dim.
The other dims of the tensor (any rank, any strides) are collapsed on the host into at most
three groups ``[G0, G1, G2]`` (adjacent dims merge when their strides allow it, for every
tensor of the launch at once); program ``row`` is decomposed as ``row = (i0 * G1 + i1) * G2
+ i2`` and its base offset is ``i0 * s0 + i1 * s1 + i2 * s2`` per tensor, so transposed,
sliced and permuted inputs run without copies.  Only a layout whose non-softmax dims do not
collapse into three groups is made contiguous first (a documented last resort).  Outputs are
contiguous with the input's shape (what ATen's meta functions promise).

Two kernels per direction (style of Triton tutorial 02 / Liger Kernel ``ops/softmax.py``);
softmax vs log-softmax is a runtime ``LOG`` flag (a uniform branch), so both share each
compiled kernel, which halves JIT (and test) compile time at no measurable cost:

* *single block*: the whole row (``N <= MAX_SINGLE_BLOCK``) sits in registers: one load,
  one max, one sum, one store.  A row with stride 1 along ``N`` (the usual last-dim case)
  becomes a vectorised load because Triton specialises integer arguments equal to 1
  (and ``N`` divisible by 16).
* *looped*: rows longer than one block (a 128k-vocab row).  The forward keeps a running
  max and a rescaled running sum per lane (online softmax), then a second pass writes;
  the backward accumulates the row reduction in a first pass and writes in a second.

Numerics follow ATen: ``softmax = exp(x - max) / sum(exp(x - max))``, ``log_softmax = x -
max - log(sum(exp(x - max)))``; a row of all ``-inf`` gives NaN, a partly ``-inf`` row
gives 0 (``-inf`` for log-softmax) there; ``+inf`` or NaN in a row gives NaN for the row.

Public: ``softmax_fwd``, ``softmax_bwd`` (launchers), ``check`` / ``check_bwd`` (why a
kernel cannot take an input), ``sm90_specs`` (every config, for compile tests), and the ops
``torch.ops.tile.softmax`` / ``log_softmax`` / ``softmax_backward`` / ``log_softmax_backward``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _common, autotune, plans

Tensor = torch.Tensor

#: Longest row one program holds in registers; longer rows use the looped kernels.
MAX_SINGLE_BLOCK = 16384
#: Smallest block of the single-block kernels (tiny rows are padded up to it).
MIN_SINGLE_BLOCK = 128
#: Largest launch grid (CUDA's limit on grid dim x).
MAX_ROWS = 2**31 - 1

KERNEL_NAMES = ("softmax_fwd", "log_softmax_fwd", "softmax_bwd", "log_softmax_bwd")


# --- kernels -------------------------------------------------------------------------

#: Kernel arguments that stay runtime values: Triton would otherwise specialise an int
#: equal to 1 into a constant, and log-softmax would compile a kernel of its own.
_RUNTIME_FLAGS = ("LOG",)


@triton.jit
def _row_offset(row, G1, G2, s0, s1, s2):
    """Element offset of row ``row`` of a tensor whose non-softmax dims are [G0, G1, G2]
    with strides [s0, s1, s2] (``row`` is int64, so the offset is too)."""
    i2 = row % G2
    t = row // G2
    i1 = t % G1
    i0 = t // G1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit(do_not_specialize=_RUNTIME_FLAGS)
def _softmax_fwd_single_kernel(
    y_ptr,  # *out  [G0, G1, G2] x [N]  output (contiguous)
    x_ptr,  # *in   [G0, G1, G2] x [N]  input (any strides)
    N,  # int: softmax-dim length, N <= BLOCK_N
    G1,  # int: size of the 2nd non-softmax dim group
    G2,  # int: size of the 3rd (innermost) non-softmax dim group
    x_s0,  # int: x stride of group 0
    x_s1,  # int: x stride of group 1
    x_s2,  # int: x stride of group 2
    x_sn,  # int: x stride along N
    y_s0,  # int: y stride of group 0
    y_s1,  # int: y stride of group 1
    y_s2,  # int: y stride of group 2
    y_sn,  # int: y stride along N
    LOG,  # int 0/1: log_softmax instead of softmax (uniform branch; one compile for both)
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row in one block
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, G1, G2, x_s0, x_s1, x_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    cols64 = cols.to(tl.int64)
    x = tl.load(x_row + cols64 * x_sn, mask=mask, other=-float("inf")).to(tl.float32)
    z = x - tl.max(x, axis=0)
    e = tl.exp(z)  # padding lanes: exp(-inf) = 0
    s = tl.sum(e, axis=0)
    if LOG:
        y = z - tl.log(s)
    else:
        y = e / s
    tl.store(y_row + cols64 * y_sn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_FLAGS)
def _softmax_fwd_looped_kernel(
    y_ptr,  # *out  [G0, G1, G2] x [N]  output (contiguous)
    x_ptr,  # *in   [G0, G1, G2] x [N]  input (any strides)
    N,  # int: softmax-dim length (any)
    G1,  # int: size of the 2nd non-softmax dim group
    G2,  # int: size of the 3rd (innermost) non-softmax dim group
    x_s0,  # int: x stride of group 0
    x_s1,  # int: x stride of group 1
    x_s2,  # int: x stride of group 2
    x_sn,  # int: x stride along N
    y_s0,  # int: y stride of group 0
    y_s1,  # int: y stride of group 1
    y_s2,  # int: y stride of group 2
    y_sn,  # int: y stride along N
    LOG,  # int 0/1: log_softmax instead of softmax (uniform branch; one compile for both)
    BLOCK_N: tl.constexpr,  # elements per step of the loop over the row
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, G1, G2, x_s0, x_s1, x_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    cols = tl.arange(0, BLOCK_N)
    # pass 1: per-lane running max m and sum d of exp(x - m) (online softmax)
    m = tl.full([BLOCK_N], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        x = tl.load(x_row + offs.to(tl.int64) * x_sn, mask=offs < N, other=-float("inf")).to(
            tl.float32
        )
        m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays
        # a lane that has seen only -inf keeps d = 0 (avoids exp(-inf - -inf) = NaN)
        d = tl.where(m_new == -float("inf"), 0.0, d * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    row_max = tl.max(m, axis=0)
    row_sum = tl.sum(tl.where(m == -float("inf"), 0.0, d * tl.exp(m - row_max)), axis=0)
    # an all -inf row: row_max = -inf, x - row_max = NaN below, like ATen
    log_sum = tl.log(row_sum)
    # pass 2: write
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        offs64 = offs.to(tl.int64)
        x = tl.load(x_row + offs64 * x_sn, mask=mask, other=-float("inf")).to(tl.float32)
        z = x - row_max
        if LOG:
            y = z - log_sum
        else:
            y = tl.exp(z) / row_sum
        tl.store(y_row + offs64 * y_sn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_FLAGS)
def _softmax_bwd_single_kernel(
    dx_ptr,  # *out [G0, G1, G2] x [N]  grad_input (contiguous)
    dy_ptr,  # *in  [G0, G1, G2] x [N]  grad_output (any strides)
    y_ptr,  # *in   [G0, G1, G2] x [N]  forward output (any strides)
    N,  # int: softmax-dim length, N <= BLOCK_N
    G1,  # int: size of the 2nd non-softmax dim group
    G2,  # int: size of the 3rd (innermost) non-softmax dim group
    dx_s0,  # int: dx stride of group 0
    dx_s1,  # int: dx stride of group 1
    dx_s2,  # int: dx stride of group 2
    dx_sn,  # int: dx stride along N
    dy_s0,  # int: dy stride of group 0
    dy_s1,  # int: dy stride of group 1
    dy_s2,  # int: dy stride of group 2
    dy_sn,  # int: dy stride along N
    y_s0,  # int: y stride of group 0
    y_s1,  # int: y stride of group 1
    y_s2,  # int: y stride of group 2
    y_sn,  # int: y stride along N
    LOG,  # int 0/1: y is log_softmax, dx = dy - exp(y) * sum(dy) (uniform branch)
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row in one block
):
    row = tl.program_id(0).to(tl.int64)
    dx_row = dx_ptr + _row_offset(row, G1, G2, dx_s0, dx_s1, dx_s2)
    dy_row = dy_ptr + _row_offset(row, G1, G2, dy_s0, dy_s1, dy_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    cols64 = cols.to(tl.int64)
    g = tl.load(dy_row + cols64 * dy_sn, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_row + cols64 * y_sn, mask=mask, other=0.0).to(tl.float32)
    if LOG:
        dx = g - tl.exp(y) * tl.sum(g, axis=0)
    else:
        dx = y * (g - tl.sum(g * y, axis=0))
    tl.store(dx_row + cols64 * dx_sn, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_FLAGS)
def _softmax_bwd_looped_kernel(
    dx_ptr,  # *out [G0, G1, G2] x [N]  grad_input (contiguous)
    dy_ptr,  # *in  [G0, G1, G2] x [N]  grad_output (any strides)
    y_ptr,  # *in   [G0, G1, G2] x [N]  forward output (any strides)
    N,  # int: softmax-dim length (any)
    G1,  # int: size of the 2nd non-softmax dim group
    G2,  # int: size of the 3rd (innermost) non-softmax dim group
    dx_s0,  # int: dx stride of group 0
    dx_s1,  # int: dx stride of group 1
    dx_s2,  # int: dx stride of group 2
    dx_sn,  # int: dx stride along N
    dy_s0,  # int: dy stride of group 0
    dy_s1,  # int: dy stride of group 1
    dy_s2,  # int: dy stride of group 2
    dy_sn,  # int: dy stride along N
    y_s0,  # int: y stride of group 0
    y_s1,  # int: y stride of group 1
    y_s2,  # int: y stride of group 2
    y_sn,  # int: y stride along N
    LOG,  # int 0/1: y is log_softmax, dx = dy - exp(y) * sum(dy) (uniform branch)
    BLOCK_N: tl.constexpr,  # elements per step of the loop over the row
):
    row = tl.program_id(0).to(tl.int64)
    dx_row = dx_ptr + _row_offset(row, G1, G2, dx_s0, dx_s1, dx_s2)
    dy_row = dy_ptr + _row_offset(row, G1, G2, dy_s0, dy_s1, dy_s2)
    y_row = y_ptr + _row_offset(row, G1, G2, y_s0, y_s1, y_s2)
    cols = tl.arange(0, BLOCK_N)
    # pass 1: the row reduction, sum(dy) (log) or sum(dy * y), accumulated per lane
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        offs64 = offs.to(tl.int64)
        g = tl.load(dy_row + offs64 * dy_sn, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            acc += g
        else:
            y = tl.load(y_row + offs64 * y_sn, mask=mask, other=0.0).to(tl.float32)
            acc += g * y
    s = tl.sum(acc, axis=0)
    # pass 2: write
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        offs64 = offs.to(tl.int64)
        g = tl.load(dy_row + offs64 * dy_sn, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + offs64 * y_sn, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * s
        else:
            dx = y * (g - s)
        tl.store(dx_row + offs64 * dx_sn, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- configs -------------------------------------------------------------------------


def _single_block(n: int) -> int:
    return max(triton.next_power_of_2(max(n, 1)), MIN_SINGLE_BLOCK)


def _single_warps(block: int) -> int:
    """Warps for a whole-row block (as Liger Kernel): 4 below 2048 elements, 8 below 8192,
    else 16 (16 to 32 fp32 elements per thread)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


def single_configs(block: int) -> list[autotune.Config]:
    """Tuning space of the single-block kernels at ``BLOCK_N=block``: the heuristic's warps,
    plus one alternative (twice as many, or half at 8192) for blocks of 4096 and up."""
    w = _single_warps(block)
    if block >= 4096:
        warps = [w, w // 2 if block == 8192 else 2 * w]
    else:
        warps = [w]
    return [autotune.Config.make(num_warps=v, num_stages=1, BLOCK_N=block) for v in warps]


def single_heuristic(block: int) -> autotune.Config:
    return autotune.Config.make(num_warps=_single_warps(block), num_stages=1, BLOCK_N=block)


#: (BLOCK_N, num_warps) of the looped kernels' tuning space.
LOOP_CONFIGS = ((2048, 4), (4096, 8), (8192, 16))


def looped_configs() -> list[autotune.Config]:
    """Tuning space of the looped kernels."""
    return [autotune.Config.make(num_warps=w, num_stages=2, BLOCK_N=b) for b, w in LOOP_CONFIGS]


def looped_heuristic(block: int | None = None) -> autotune.Config:
    """4096-element steps with 8 warps; a forced ``block`` (tests) scales the warps."""
    b = 4096 if block is None else block
    return autotune.Config.make(num_warps=min(max(b // 512, 4), 16), num_stages=2, BLOCK_N=b)


def _all_single_blocks() -> list[int]:
    out, b = [], MIN_SINGLE_BLOCK
    while b <= MAX_SINGLE_BLOCK:
        out.append(b)
        b *= 2
    return out


# --- host side: layout planning --------------------------------------------------------


def _wrap_dim(dim: int, ndim: int) -> int:
    """ATen's maybe_wrap_dim (a 0-dim tensor takes dim 0 or -1)."""
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], "
            f"but got {dim})"
        )
    return dim + rank if dim < 0 else dim


def _groups(
    shape: tuple[int, ...], dim: int, strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]] | None:
    """Collapse the non-softmax dims of ``shape`` into groups that are valid for every
    tensor's ``strides``; return (group sizes, per-tensor group strides), padded to 3
    groups, or None when more than 3 groups remain."""
    sizes: list[int] = []
    gstrides: list[list[int]] = []  # [group][tensor]
    for d, size in enumerate(shape):
        if d == dim or size == 1:
            continue
        sts = [s[d] for s in strides]
        # merging with the previous (outer) group: offset io*S + ii*s == (io*size + ii)*s
        if sizes and all(prev == s * size for prev, s in zip(gstrides[-1], sts)):
            sizes[-1] *= size
            gstrides[-1] = sts
            continue
        sizes.append(size)
        gstrides.append(sts)
    if len(sizes) > 3:
        return None
    while len(sizes) < 3:  # pad innermost with size-1 groups (specialised away on GPU)
        sizes.append(1)
        gstrides.append([0] * len(strides))
    per_tensor = [[gstrides[g][t] for g in range(3)] for t in range(len(strides))]
    return sizes, per_tensor


def _plan(tensors: list[Tensor], dim: int):
    """(tensors, G1, G2, [[s0, s1, s2, sn] per tensor]) for a launch; the inputs are made
    contiguous only when their layout does not collapse into three groups."""
    shape = tuple(tensors[0].shape)
    got = _groups(shape, dim, [tuple(t.stride()) for t in tensors])
    if got is None:  # exotic layout (4+ scattered dim groups): last resort, copy
        tensors = [tensors[0]] + [t.contiguous() for t in tensors[1:]]
        got = _groups(shape, dim, [tuple(t.stride()) for t in tensors])
        assert got is not None
    sizes, per_tensor = got
    args = [[*st, t.stride(dim)] for st, t in zip(per_tensor, tensors)]
    return tensors, sizes[1], sizes[2], args


def _dtype_name(dtype: torch.dtype) -> str:
    return _common.triton_dtype_name(dtype)


# --- host launchers --------------------------------------------------------------------


@_common.memo_reason
def check(x, dim) -> str | None:
    """Why the softmax kernels cannot take ``x`` (softmax over ``dim``), or None.

    Safe on fake tensors with symbolic shapes (the grid-size check is then skipped)."""
    reason = _common.device_reason(x) or _common.dtype_reason(x)
    if reason:
        return reason
    if isinstance(dim, bool) or not isinstance(dim, int):
        return f"dim {dim!r} is not an int"
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        return f"dim {dim} is out of range for a {x.dim()}-dim tensor"
    if x.dim() > 0 and all(isinstance(s, int) for s in x.shape):
        n = x.shape[dim]
        rows = math.prod(x.shape) // n if n else 0
        if rows > MAX_ROWS:
            return f"{rows} rows exceed the launch grid limit {MAX_ROWS}"
    return None


@_common.memo_reason
def check_bwd(grad, out, dim, input_dtype) -> str | None:
    """Why the backward kernels cannot take (``grad``, ``out``) over ``dim`` for a forward
    input of ``input_dtype``, or None."""
    reason = check(grad, dim) or _common.device_reason(out) or _common.dtype_reason(out)
    if reason:
        return reason
    if grad.shape != out.shape:
        return f"grad_output shape {tuple(grad.shape)} != output shape {tuple(out.shape)}"
    if grad.device != out.device:
        return f"grad_output on {grad.device}, output on {out.device}"
    for log in (False, True):
        dx_dtype = _bwd_out_dtype(log, grad.dtype, input_dtype)
        if dx_dtype not in _common.SUPPORTED_DTYPES:
            return f"grad_input dtype {dx_dtype} (input_dtype {input_dtype}) is not supported"
    return None


@functools.cache
def _bwd_out_dtype(log: bool, grad_dtype: torch.dtype, input_dtype) -> torch.dtype | None:
    """grad_input dtype, as ATen's meta function gives it for this torch version (None
    when ATen rejects the combination)."""
    op = (
        torch.ops.aten._log_softmax_backward_data.default
        if log
        else torch.ops.aten._softmax_backward_data.default
    )
    g = torch.empty(1, dtype=grad_dtype, device="meta")
    try:
        return op(g, g, 0, input_dtype).dtype
    except Exception:
        return None


def _is_empty(shape: tuple[int, ...]) -> bool:
    return math.prod(shape) == 0


def softmax_fwd(
    x: Tensor, dim: int, log: bool, half_to_float: bool, *, block_n: int | None = None
) -> Tensor:
    """``aten._softmax`` (``log=False``) / ``aten._log_softmax`` (``log=True``) of ``x`` over
    ``dim``; ``half_to_float`` gives an fp32 result.  Output is contiguous.

    ``block_n`` (a power of two, for tests) forces the block size: rows longer than it
    run the looped kernel.
    """
    reason = check(x, dim)
    if reason:
        raise ValueError(f"softmax_fwd: {reason}")
    out_dtype = torch.float32 if half_to_float else x.dtype
    if x.dim() == 0:  # a scalar is a 1-element row (softmax 1, log_softmax 0, like torch)
        return softmax_fwd(x.reshape(1), 0, log, half_to_float, block_n=block_n).reshape(())
    dim = _wrap_dim(dim, x.dim())
    shape = tuple(x.shape)
    y = _common.empty(shape, out_dtype, x.device)
    if _is_empty(shape):
        return y
    n = shape[dim]
    rows = x.numel() // n
    (y, x), g1, g2, (ys, xs) = _plan([y, x], dim)  # x is copied only as a last resort
    name = "log_softmax_fwd" if log else "softmax_fwd"

    def launch(kernel, cfg: autotune.Config):
        _common.launch(kernel, (rows,), y, x, n, g1, g2, *xs, *ys, LOG=int(log), **cfg.as_kwargs())

    _select_and_launch(name, x.dtype, out_dtype, n, xs[3] == 1, block_n, launch, fwd=True)
    return y


def softmax_bwd(
    grad: Tensor,
    out: Tensor,
    dim: int,
    log: bool,
    input_dtype: torch.dtype,
    *,
    block_n: int | None = None,
) -> Tensor:
    """``aten._softmax_backward_data`` (``log=False``: ``out`` is the softmax, ``dx = out *
    (grad - sum(grad * out))``) / ``aten._log_softmax_backward_data`` (``log=True``: ``dx =
    grad - exp(out) * sum(grad)``) over ``dim``; grad_input in ATen's dtype for
    ``input_dtype``.  ``block_n`` as in :func:`softmax_fwd`."""
    reason = check_bwd(grad, out, dim, input_dtype)
    if reason:
        raise ValueError(f"softmax_bwd: {reason}")
    dx_dtype = _bwd_out_dtype(log, grad.dtype, input_dtype)
    if grad.dim() == 0:
        dx = softmax_bwd(grad.reshape(1), out.reshape(1), 0, log, input_dtype, block_n=block_n)
        return dx.reshape(())
    dim = _wrap_dim(dim, grad.dim())
    shape = tuple(grad.shape)
    dx = _common.empty(shape, dx_dtype, grad.device)
    if _is_empty(shape):
        return dx
    n = shape[dim]
    rows = grad.numel() // n
    (dx, grad, out), g1, g2, (dxs, dys, ys) = _plan([dx, grad, out], dim)
    name = "log_softmax_bwd" if log else "softmax_bwd"

    def launch(kernel, cfg: autotune.Config):
        _common.launch(
            kernel,
            (rows,),
            dx,
            grad,
            out,
            n,
            g1,
            g2,
            *dxs,
            *dys,
            *ys,
            LOG=int(log),
            **cfg.as_kwargs(),
        )

    contiguous = dys[3] == 1 and ys[3] == 1
    _select_and_launch(name, grad.dtype, dx_dtype, n, contiguous, block_n, launch, fwd=False)
    return dx


def _select_and_launch(name, in_dtype, out_dtype, n, contiguous, block_n, launch, fwd):
    single_k = _softmax_fwd_single_kernel if fwd else _softmax_bwd_single_kernel
    looped_k = _softmax_fwd_looped_kernel if fwd else _softmax_bwd_looped_kernel
    if block_n is not None:
        if block_n <= 0 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two, got {block_n}")
        if n <= block_n:
            cfg = single_heuristic(block_n)
            launch(single_k, cfg)
        else:
            launch(looped_k, looped_heuristic(block_n))
        return
    if n <= MAX_SINGLE_BLOCK:
        block = _single_block(n)
        kernel, configs, heur = single_k, single_configs(block), single_heuristic(block)
        variant = "single"
    else:
        kernel, configs, heur = looped_k, looped_configs(), looped_heuristic()
        variant = "looped"
    key = (in_dtype, out_dtype, variant, autotune.bucket(n), contiguous)
    cfg = autotune.select(name, key, configs, heur, lambda c: launch(kernel, c))
    launch(kernel, cfg)


# --- torch.library custom ops ----------------------------------------------------------


def _aten_fwd(log: bool):
    return torch.ops.aten._log_softmax.default if log else torch.ops.aten._softmax.default


def _aten_bwd(log: bool):
    return (
        torch.ops.aten._log_softmax_backward_data.default
        if log
        else torch.ops.aten._softmax_backward_data.default
    )


def _layout_key(t: Tensor, dim: int) -> tuple:
    if t.dim() == 0:
        return (True, False)
    return (t.stride(dim) == 1, t.shape[dim] > MAX_SINGLE_BLOCK)


def _fwd_impl(x: Tensor, dim: int, half_to_float: bool, log: bool) -> Tensor:
    aten = _aten_fwd(log)
    if check(x, dim) is not None:
        return aten(x, dim, half_to_float)
    return _common.guarded(
        "log_softmax_fwd" if log else "softmax_fwd",
        key=(x.dtype, half_to_float, *_layout_key(x, dim)),
        run=lambda: softmax_fwd(x, dim, log, half_to_float),
        fallback=lambda: aten(x, dim, half_to_float),
    )


def _bwd_impl(grad: Tensor, out: Tensor, dim: int, input_dtype: torch.dtype, log: bool) -> Tensor:
    aten = _aten_bwd(log)
    if check_bwd(grad, out, dim, input_dtype) is not None:
        return aten(grad, out, dim, input_dtype)
    return _common.guarded(
        "log_softmax_bwd" if log else "softmax_bwd",
        key=(grad.dtype, out.dtype, input_dtype, *_layout_key(grad, dim)),
        run=lambda: softmax_bwd(grad, out, dim, log, input_dtype),
        fallback=lambda: aten(grad, out, dim, input_dtype),
    )


@torch.library.custom_op(
    "tile::softmax", mutates_args=(), schema="(Tensor x, int dim, bool half_to_float) -> Tensor"
)
@plans.planned("tile::softmax")
def softmax_op(x: Tensor, dim: int, half_to_float: bool) -> Tensor:
    """Mirrors ``aten::_softmax(Tensor self, int dim, bool half_to_float) -> Tensor``."""
    return _fwd_impl(x, dim, half_to_float, log=False)


@torch.library.custom_op(
    "tile::log_softmax", mutates_args=(), schema="(Tensor x, int dim, bool half_to_float) -> Tensor"
)
@plans.planned("tile::log_softmax")
def log_softmax_op(x: Tensor, dim: int, half_to_float: bool) -> Tensor:
    """Mirrors ``aten::_log_softmax(Tensor self, int dim, bool half_to_float) -> Tensor``."""
    return _fwd_impl(x, dim, half_to_float, log=True)


@torch.library.custom_op(
    "tile::softmax_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor output, int dim, ScalarType input_dtype) -> Tensor",
)
@plans.planned("tile::softmax_backward")
def softmax_backward_op(
    grad_output: Tensor, output: Tensor, dim: int, input_dtype: torch.dtype
) -> Tensor:
    """Mirrors ``aten::_softmax_backward_data(Tensor grad_output, Tensor output, int dim,
    ScalarType input_dtype) -> Tensor``."""
    return _bwd_impl(grad_output, output, dim, input_dtype, log=False)


@torch.library.custom_op(
    "tile::log_softmax_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor output, int dim, ScalarType input_dtype) -> Tensor",
)
@plans.planned("tile::log_softmax_backward")
def log_softmax_backward_op(
    grad_output: Tensor, output: Tensor, dim: int, input_dtype: torch.dtype
) -> Tensor:
    """Mirrors ``aten::_log_softmax_backward_data(Tensor grad_output, Tensor output, int dim,
    ScalarType input_dtype) -> Tensor``."""
    return _bwd_impl(grad_output, output, dim, input_dtype, log=True)


@softmax_op.register_fake
def _(x, dim, half_to_float):
    return torch.ops.aten._softmax.default(x, dim, half_to_float)


@log_softmax_op.register_fake
def _(x, dim, half_to_float):
    return torch.ops.aten._log_softmax.default(x, dim, half_to_float)


@softmax_backward_op.register_fake
def _(grad_output, output, dim, input_dtype):
    return torch.ops.aten._softmax_backward_data.default(grad_output, output, dim, input_dtype)


@log_softmax_backward_op.register_fake
def _(grad_output, output, dim, input_dtype):
    return torch.ops.aten._log_softmax_backward_data.default(grad_output, output, dim, input_dtype)


def _setup_context(ctx, inputs, output):
    x, dim, _half_to_float = inputs
    ctx.save_for_backward(output)
    ctx.dim = dim
    ctx.input_dtype = x.dtype


def _softmax_grad(ctx, grad):
    (out,) = ctx.saved_tensors
    return torch.ops.tile.softmax_backward(grad, out, ctx.dim, ctx.input_dtype), None, None


def _log_softmax_grad(ctx, grad):
    (out,) = ctx.saved_tensors
    return torch.ops.tile.log_softmax_backward(grad, out, ctx.dim, ctx.input_dtype), None, None


softmax_op.register_autograd(_softmax_grad, setup_context=_setup_context)
log_softmax_op.register_autograd(_log_softmax_grad, setup_context=_setup_context)


# --- every config, for compile tests on sm_90 --------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Mixed (input, output) dtypes: fp16/bf16 -> fp32 forward (half_to_float), fp32 -> fp16/bf16
#: backward.  Only the pointer types change, so these compile the heaviest config only.
_MIXED_FWD = ((torch.float16, torch.float32), (torch.bfloat16, torch.float32))
_MIXED_BWD = ((torch.float32, torch.float16), (torch.float32, torch.bfloat16))
_INT_ARGS_FWD = ("N", "G1", "G2", "x_s0", "x_s1", "x_s2", "x_sn", "y_s0", "y_s1", "y_s2", "y_sn")
_INT_ARGS_BWD = ("N", "G1", "G2") + tuple(
    f"{p}_s{i}" for p in ("dx", "dy", "y") for i in ("0", "1", "2", "n")
)


def _spec(fwd: bool, variant: str, in_dt, out_dt, cfg: autotune.Config) -> dict:
    if fwd:
        fn = _softmax_fwd_single_kernel if variant == "single" else _softmax_fwd_looped_kernel
        sig = {"y_ptr": f"*{_dtype_name(out_dt)}", "x_ptr": f"*{_dtype_name(in_dt)}"}
        ints, unit = _INT_ARGS_FWD, ("x_sn", "y_sn")
    else:
        fn = _softmax_bwd_single_kernel if variant == "single" else _softmax_bwd_looped_kernel
        sig = {
            "dx_ptr": f"*{_dtype_name(out_dt)}",
            "dy_ptr": f"*{_dtype_name(in_dt)}",
            "y_ptr": f"*{_dtype_name(in_dt)}",
        }
        ints, unit = _INT_ARGS_BWD, ("dx_sn", "dy_sn", "y_sn")
    # strides along N equal to 1 (the last-dim fast path) are constants at launch
    sig.update({a: "i32" for a in ints if a not in unit})
    sig["LOG"] = "i32"  # an int, not a bool: triton 3.6's interpreter rejects bool args
    constexprs = {u: 1 for u in unit}
    constexprs.update(cfg.kwargs)
    op = "softmax" + ("_fwd" if fwd else "_bwd")
    return {
        "name": f"{op}_{variant}[{_dtype_name(in_dt)}->{_dtype_name(out_dt)}, {cfg}]",
        "fn": fn,
        "signature": sig,
        "constexprs": constexprs,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def sm90_specs() -> list[dict]:
    """Compile specs for sm_90: every config of each kernel's tuning space (single-block:
    every block size up to ``MAX_SINGLE_BLOCK``; looped), for fp32 / fp16 / bf16, plus the
    mixed-dtype variants on the heaviest config of each kernel.  (``LOG`` is a runtime
    argument, so softmax and log-softmax share each compiled kernel.)"""
    variants = {
        "single": [c for b in _all_single_blocks() for c in single_configs(b)],
        "looped": looped_configs(),
    }
    specs = []
    for fwd in (True, False):
        mixed = _MIXED_FWD if fwd else _MIXED_BWD
        for variant, configs in variants.items():
            for dt in _DTYPES:
                specs += [_spec(fwd, variant, dt, dt, c) for c in configs]
            heaviest = max(configs, key=lambda c: (c["BLOCK_N"], c.num_warps))
            specs += [_spec(fwd, variant, i, o, heaviest) for i, o in mixed]
    return specs
