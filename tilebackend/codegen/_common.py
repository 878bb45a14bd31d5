"""Shared host-side helpers for every kernel file: device checks, output allocation
(with poisoning for tests), launch counters, guarded launches with an ATen fallback,
and compilation for a GPU target without a GPU (for tests of every config)."""

from __future__ import annotations

import collections
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .. import _compat, settings
from .._compat import interpret_mode
from ..exc import TuningArtifactError
from . import plans

log = logging.getLogger("tilebackend")

#: Successful tile-kernel launches, by kernel name.  Tests assert on these.
launch_counts: collections.Counter[str] = collections.Counter()
#: Calls that fell back to ATen at run time (a kernel failed), by kernel name.
fallback_counts: collections.Counter[str] = collections.Counter()
_warned: set[object] = set()  # keys of the warnings given (warn_once)
_broken: dict[tuple, str] = {}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Yield a Counter of tile-kernel launches made inside the block."""
    before = collections.Counter(launch_counts)
    delta: collections.Counter[str] = collections.Counter()
    try:
        yield delta
    finally:
        for k, v in launch_counts.items():
            if v - before.get(k, 0):
                delta[k] = v - before.get(k, 0)


def device_reason(t: Any) -> str | None:
    """Why tensor ``t`` cannot run a tile kernel, or None when it can."""
    dev = getattr(t, "device", None)
    if dev is None:
        return "not a tensor"
    if dev.type == "cuda":
        return None
    if dev.type == "cpu":
        if interpret_mode():
            return None
        return "CPU tensor and TRITON_INTERPRET=1 is not set (the Triton interpreter runs kernels on CPU)"
    return f"device {dev.type!r} is not supported (cuda, or cpu with TRITON_INTERPRET=1)"


def meta_key(args: Sequence[Any], inputs: list[torch.Tensor] | None = None) -> tuple:
    """A hashable key of what a check reads from its arguments: a tensor's dtype, device,
    shape and strides (never its values), lists and tuples item by item, anything else as
    itself.  Raises TypeError for symbolic sizes or an unhashable argument.

    With ``inputs`` (a list), the tensors are also collected there in order and each is
    keyed by its aliasing too (the index of the first input with its data pointer) and
    by whether it is 16-byte aligned (a launch may read it through TMA), as :mod:`.plans`
    needs; that reads data pointers (RuntimeError for fake tensors)."""
    ptrs: dict[int, int] | None = {} if inputs is not None else None
    key = _meta(args, inputs, ptrs)
    hash(key)  # fail here (not in a dict) for symbolic sizes
    return key


def _meta(args: Sequence[Any], inputs: list | None, ptrs: dict | None) -> tuple:
    # (every tile-op call builds this key: kept to plain loops and local names)
    out: list[Any] = []
    append = out.append
    tensor = torch.Tensor
    for a in args:
        if isinstance(a, tensor):
            if inputs is None:
                append((a.dtype, a.device, a.shape, a.stride()))
            else:
                ptr = a.data_ptr()
                alias = ptrs.setdefault(ptr, len(inputs))
                # (alignment too: a launch may read 16-byte aligned inputs through TMA)
                append((a.dtype, a.device, a.shape, a.stride(), alias, ptr % 16 == 0))
                inputs.append(a)
        elif isinstance(a, (list, tuple)):
            if any(isinstance(x, (tensor, list, tuple)) for x in a):
                append((len(a), _meta(a, inputs, ptrs)))
            else:  # sizes, dims: the values themselves
                append((len(a), tuple(a)))
        else:
            append(a)
    return tuple(out)


_MISS = object()
_MEMO_LIMIT = 4096


def memo_reason(fn: Callable[..., str | None]) -> Callable[..., str | None]:
    """Memoise a ``check``: why a kernel cannot take its arguments depends only on their
    metadata (:func:`meta_key`) and on the interpreter mode, and every tile-op call asks
    (the op, then the launcher).  Symbolic sizes are checked afresh each time."""
    memo: dict[tuple, str | None] = {}

    @functools.wraps(fn)
    def check(*args: Any, **kwargs: Any) -> str | None:
        try:
            key = (interpret_mode(), meta_key(args), meta_key(sorted(kwargs.items())))
        except TypeError:
            return fn(*args, **kwargs)
        hit = memo.get(key, _MISS)
        if hit is _MISS:
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            hit = memo[key] = fn(*args, **kwargs)
        return hit

    check.cache_clear = memo.clear  # type: ignore[attr-defined]
    return check


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids on the host (``triton.cdiv`` is a
    ``ConstexprFunction`` since triton 3.7, several microseconds a call)."""
    return -(-a // b)


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` for concrete sizes, without its symbolic-shape path
    (a tenth of the cost; tile ops call it per launch).  Raises RuntimeError likewise."""
    if not all(type(d) is int for s in shapes for d in s):  # symbolic: torch's own
        return tuple(torch.broadcast_shapes(*shapes))
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        off = ndim - len(s)
        for i, d in enumerate(s):
            j = off + i
            if d != out[j]:
                if out[j] == 1:
                    out[j] = d
                elif d != 1:
                    raise RuntimeError(
                        f"shapes {', '.join(str(tuple(x)) for x in shapes)} do not broadcast"
                    )
    return tuple(out)


def dtype_reason(t: Any, allowed=SUPPORTED_DTYPES) -> str | None:
    dt = getattr(t, "dtype", None)
    if dt not in allowed:
        return f"dtype {dt} is not supported (expects one of {', '.join(map(str, allowed))})"
    return None


def dot_reason(t: Any) -> str | None:
    """Why a ``tl.dot`` kernel must not take tensor ``t``: Triton's CPU interpreter
    multiplies bf16 operands' bit patterns (triton-lang/triton#11584), so a bf16 GEMM on
    the CPU stays ATen's rather than return wrong numbers.  None on a GPU."""
    dev = getattr(t, "device", None)
    if getattr(t, "dtype", None) == torch.bfloat16 and getattr(dev, "type", None) == "cpu":
        return "bf16 GEMMs are wrong in Triton's CPU interpreter (triton#11584)"
    return None


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; filled with NaN / a sentinel when poisoning is on."""
    if settings.current().poison_outputs:
        fill = float("nan") if dtype.is_floating_point else -7
        t = torch.full(shape, fill, dtype=dtype, device=device)
    else:
        t = torch.empty(shape, dtype=dtype, device=device)
    if plans.recording() is not None:
        plans.on_alloc(t)
    return t


#: Every tile kernel is compiled with FMA contraction (``a * b + c`` as one rounding), as
#: triton <= 3.9 does by default and nvcc does for ATen's kernels.  Triton 3.9 warns that
#: its default becomes "off" in 3.10; passing it keeps our numerics and speed the same on
#: triton 3.6 to 3.10+, without the warning.  (The interpreter ignores the option.)
FP_FUSION = True

_watches: list[list[Any]] = []  # open :func:`watch_launches` scopes, innermost last
_thread = threading.local()


@contextmanager
def compile_only() -> Iterator[None]:
    """In this thread's scope, :func:`launch` compiles its kernel (Triton's ``warmup``)
    and runs nothing: the autotuner compiles its candidates in parallel this way."""
    _thread.compile_only = True
    try:
        yield
    finally:
        _thread.compile_only = False


@contextmanager
def watch_launches() -> Iterator[list[Any]]:
    """Collect what each :func:`launch` in the scope returns (on a GPU, Triton's compiled
    kernel, whose ``n_regs`` / ``n_spills`` the autotuner reads)."""
    got: list[Any] = []
    _watches.append(got)
    try:
        yield got
    finally:
        _watches.remove(got)


class _WithScratch:
    """``kernel[grid]`` that first gives Triton its scratch allocator (a kernel that builds
    TMA descriptors needs one; recorded as the launch, so a replayed plan sets it too)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _compat.ensure_triton_allocator()
        return self.fn(*args, **kwargs)


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)``; every tile kernel is launched through here, so
    that :mod:`.plans` can record the launch.  FMA contraction is asked for explicitly
    (see :data:`FP_FUSION`).  A ``TMA=True`` launch gets Triton's scratch allocator."""
    kwargs["enable_fp_fusion"] = FP_FUSION
    if getattr(_thread, "compile_only", False):
        return kernel.warmup(*args, grid=grid, **kwargs)
    if kwargs.get("TMA") and not interpret_mode():
        compiled = plans.on_call(_WithScratch(kernel[grid]), args, kwargs)
    elif interpret_mode():
        import numpy

        # (the interpreter runs masked-off lanes too: -inf - -inf there is not a finding)
        with numpy.errstate(invalid="ignore", divide="ignore", over="ignore"):
            compiled = plans.on_launch(kernel, grid, args, kwargs)
    else:
        compiled = plans.on_launch(kernel, grid, args, kwargs)
    if _watches:
        _watches[-1].append(compiled)
    return compiled


def host_op(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for a host op that writes into tensors it is given
    (``out=``), recorded by :mod:`.plans` like a launch."""
    return plans.on_call(fn, args, kwargs)


def warn_once(key: object, msg: str, stacklevel: int = 3) -> None:
    """``msg`` as a RuntimeWarning, the first time ``key`` is seen (until ``reset``)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def guarded(kernel: str, key: tuple, run: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
    """Run a tile kernel; if it fails to compile or launch, warn once and use ATen.

    ``key`` identifies the specialisation (dtype, flags) so that one broken variant does
    not disable the others; a variant that failed once is not retried.
    """
    full_key = (kernel, *key)
    if full_key in _broken:
        fallback_counts[kernel] += 1
        return fallback()
    try:
        out = run()
    except TuningArtifactError as e:
        # not the kernel's failure (a tuning artifact that went away, say): ATen for this
        # call, and the kernel is tried again on the next
        msg = f"tilebackend: kernel {kernel!r} not launched ({e}); ATen for this call"
        warn_once(msg, msg)
        fallback_counts[kernel] += 1
        return fallback()
    except Exception as e:  # compile / launch failures from Triton surface here
        _broken[full_key] = f"{type(e).__name__}: {e}"
        warn_once(
            kernel,
            f"tilebackend: kernel {kernel!r} failed ({type(e).__name__}: {e}); "
            "falling back to ATen for this case",
        )
        log.warning("kernel %s failed for %s: %s", kernel, key, e)
        fallback_counts[kernel] += 1
        return fallback()
    if _numel(out):  # an empty result launches nothing: don't claim a launch
        launch_counts[kernel] += 1
    return out


def guarded_op(
    kernel: str, reason: str | None, key: tuple, run: Callable[[], Any], fallback: Callable[[], Any]
) -> Any:
    """``fallback()`` when ``reason`` says the kernel cannot take the case, else
    :func:`guarded`."""
    if reason is not None:
        return fallback()
    return guarded(kernel, key=key, run=run, fallback=fallback)


def _numel(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (list, tuple)):
        return sum(_numel(o) for o in out)
    return 0


def reset_failures() -> None:
    """Forget kernels that failed (tests use this)."""
    _broken.clear()
    _warned.clear()


#: Programs a persistent kernel runs in the interpreter (a few, so that each walks
#: several tiles in the tests).
INTERPRET_PROGRAMS = 3


def persistent_programs(device: torch.device) -> int:
    """How many programs a persistent kernel launches on ``device``: one per SM (the
    TMA GEMM configs use most of an SM's shared memory)."""
    return sm_count(device) if device.type == "cuda" else INTERPRET_PROGRAMS


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (read once per device)."""
    return _cuda_properties(_cuda_index(device)).multi_processor_count


def tma_capable(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use TMA descriptors: a Hopper or later GPU (or
    the interpreter) with a Triton that builds them in a kernel."""
    if not _compat.has_device_tma():
        return False
    if device.type != "cuda":
        return interpret_mode()
    props = _cuda_properties(_cuda_index(device))
    return (props.major, props.minor) >= (9, 0)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _cuda_properties(index: int) -> Any:
    return torch.cuda.get_device_properties(index)


def tf32_allowed() -> bool:
    """Follow PyTorch's numerics setting for fp32 matmul."""
    return _compat.cublas_allow_tf32()


def triton_dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.int32: "i32",
        torch.int64: "i64",
    }[dtype]


# --- compiling for a GPU target without a GPU (tests) --------------------------------

HOPPER_SMEM_BYTES = 232448  # max dynamic shared memory per block on sm_90


def compile_for_target(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int = 4,
    num_stages: int = 3,
    capability: int = 90,
    divisible: Sequence[str] = (),
):
    """Compile ``fn`` (a JITFunction) for ``cuda:sm_<capability>``; return the compiled kernel.

    Needs no GPU.  Raises on compile errors; the caller checks ``.metadata.shared``.
    Must run in a process without TRITON_INTERPRET (jit functions are interpreted there).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    # the JIT marks 16-byte-aligned pointers / ints divisible by 16; without the hint
    # Triton won't pipeline vectorised loads and reports too little shared memory
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, sig, constexprs, attrs=attrs or None)
    return triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": FP_FUSION},
    )


def resource_usage(kernel) -> dict[str, int] | None:
    """``{"regs", "local", "stack"}`` of a kernel compiled for an NVIDIA target, per
    thread: registers, bytes of local-memory arrays, and bytes of stack frame (where
    ptxas spills registers: ``ptxas -v`` reports the same bytes as spill stores), as
    ``cuobjdump --dump-resource-usage`` reads them from the cubin.  None when there is no
    cubin or no cuobjdump.  Needs no GPU."""
    import re
    import subprocess
    import tempfile

    from .. import _compat

    tool, cubin = _compat.cuobjdump_path(), getattr(kernel, "asm", {}).get("cubin")
    if not tool or not cubin:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60
        ).stdout
    found = {k: re.search(rf"\b{k.upper()}:(\d+)", out) for k in ("reg", "local", "stack")}
    if not all(found.values()):
        return None
    return {
        "regs": int(found["reg"][1]),
        "local": int(found["local"][1]),
        "stack": int(found["stack"][1]),
    }
