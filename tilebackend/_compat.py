"""Version probes and every private torch / triton import, in one place.

Supported: torch 2.11 - 2.13+, triton 3.6 - 3.9+. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates, so it must be set
    before tilebackend's kernel modules are imported (the demo sets it itself, after
    asking).  Read on every call, never cached: a replayed launch plan does not ask.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --- custom ops (private) --------------------------------------------------------------


def custom_op_parts(op: Any) -> tuple[Any, Any] | None:
    """``(implementation, fake)`` of an op made by ``torch.library.custom_op`` (the
    Python functions it was defined with), or None for any other op."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(op._schema.name)
    impl = getattr(opdef, "_init_fn", None)
    fake = getattr(opdef, "_abstract_fn", None)
    if impl is None or fake is None:
        return None
    return impl, fake


# --- AOTAutograd / Inductor (private) ------------------------------------------------


def python_dispatcher():
    """The context AOTAutograd and Inductor propagate fake values in: some ATen meta
    functions (``baddbmm``'s bias expand) take symbolic sizes only through the Python
    dispatcher, and fail with "SymIntArrayRef expected to contain only concrete
    integers" without it (depending on which kernels earlier traces left registered)."""
    from torch._dispatch.python import enable_python_dispatcher

    return enable_python_dispatcher()


def aot_module_simplified(*args: Any, **kwargs: Any):
    from torch._functorch.aot_autograd import aot_module_simplified as fn

    return fn(*args, **kwargs)


def aot_function(*args: Any, **kwargs: Any):
    from torch._functorch.aot_autograd import aot_function as fn

    return fn(*args, **kwargs)


def make_boxed_func(fn):
    from torch._functorch.aot_autograd import make_boxed_func as mbf

    return mbf(fn)


def default_partition():
    from torch._functorch.partitioners import default_partition as dp

    return dp


def inductor_compile_fx(
    gm, example_inputs, inner_compile, decompositions, config_patches=None, cache_tag=None
):
    """Inductor's ``compile_fx`` around our ``inner_compile``.

    AOTAutograd's cache is keyed by the Dynamo graph and the configs, not by
    ``inner_compile``: a graph that plain Inductor compiled before (in any process
    sharing the cache dir) would be loaded from Inductor's artifact, and our rewrite
    would never run.  So that cache is off, unless ``cache_tag`` (see
    ``compile_cache.tag``) is given: it joins the key through torch's
    ``cache_key_tag``, which keeps our entries apart from plain Inductor's."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def run():
        return compile_fx(
            gm,
            example_inputs,
            inner_compile=inner_compile,
            decompositions=decompositions,
            config_patches=config_patches or None,
        )

    if cache_tag is None:
        with functorch_config.patch(enable_autograd_cache=False):
            return run()
    import torch.compiler.config as compiler_config

    user_tag = compiler_config.cache_key_tag
    with compiler_config.patch(cache_key_tag=f"{user_tag}|{cache_tag}" if user_tag else cache_tag):
        return run()


def aot_cache_hits() -> int:
    """AOTAutograd cache hits so far in this process (Dynamo's counters)."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_hit"]


def namespace_op_names(namespace: str) -> list[str]:
    """The op names (without overload) registered under ``namespace``."""
    prefix = namespace + "::"
    all_names = torch._C._dispatch_get_all_op_names()
    return sorted({n[len(prefix) :].split(".")[0] for n in all_names if n.startswith(prefix)})


def detect_fake_mode(values):
    """The FakeTensorMode the fake tensors among ``values`` belong to, or None."""
    from torch._guards import detect_fake_mode as detect

    return detect(values)


def inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """Inductor's config for ``torch.compile``'s ``mode`` (e.g. CUDA graphs for
    ``"reduce-overhead"``)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def lazy_backward_keeps_graph() -> bool:
    """A backward is running now (this is AOTAutograd's lazy backward compile) and it
    keeps its graph (``retain_graph`` / ``create_graph``): AOTAutograd then compiles the
    backward without donated buffers (its ``bw_donated_idxs`` are reset to ``[]``)."""
    return (
        torch._C._current_graph_task_id() != -1
        and torch._C._autograd._get_current_graph_task_keep_graph()
    )


def inductor_fx_graph_cache_off():
    """A context in which Inductor's FX graph cache is neither read nor written."""
    from torch._inductor import config

    return config.patch(fx_graph_cache=False)


def inductor_compile_fx_inner():
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner


@functools.lru_cache(maxsize=1)
def inductor_decomposition_table() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    return dict(select_decomp_table())


@contextlib.contextmanager
def isolated_tracing():
    """Trace something unrelated (a pattern) while Dynamo is mid-compile: no ambient
    TracingContext, fake mode or Dynamo frame state may leak into it."""
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with tracing(None), unset_fake_temporarily():
        yield


def module_float_inputs(gm: Any) -> list[tuple[str, str, float]]:
    """``(symbol, source name, value)`` of each float that Dynamo made a graph input
    (``dynamic=True``: a 0-dim tensor read with ``.item()``) and that is an attribute of
    an ``nn.Module`` (a hyperparameter: an eps, a scale).  Empty when this torch has no
    such inputs or no way to specialise them (:func:`specialize_floats`)."""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis  # noqa: F401
        from torch._dynamo.symbolic_convert import TensorifyState  # noqa: F401
    except ImportError:
        return []
    found = []
    for n in gm.graph.nodes:
        if not (n.op == "call_method" and n.target == "item" and n.args):
            continue
        ph, val = n.args[0], n.meta.get("example_value")
        source = getattr(getattr(ph, "meta", {}).get("grapharg"), "source", None)
        if ph.op != "placeholder" or not isinstance(val, torch.SymFloat) or source is None:
            continue
        expr = val.node.expr
        if not getattr(expr, "is_Symbol", False) or not _is_module_attribute(source):
            continue
        name = source.name() if callable(source.name) else source.name
        found.append((str(expr), str(name), val.node.hint))
    return found


def _is_module_attribute(source: Any) -> bool:
    gs = getattr(source, "guard_source", None)
    gs = gs() if callable(gs) else gs
    checks = ("is_unspecialized_nn_module", "is_specialized_nn_module", "is_nn_module")
    return any(bool(getattr(gs, c, lambda: False)()) for c in checks) and hasattr(source, "member")


def specialize_floats(symbols: list[str]) -> None:
    """Make Dynamo re-trace the frame with these float symbols constant (its own
    mechanism, which the tensorify pass uses: each value gets a guard).  Raises
    Dynamo's restart exception, which the backend must let through."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState

    for s in symbols:
        TensorifyState.specialize(s)
    raise TensorifyScalarRestartAnalysis


def dynamo_control_flow() -> tuple[type[BaseException], ...]:
    """Exceptions Dynamo raises to restart or skip a frame: never swallow these."""
    import torch._dynamo.exc as exc

    return tuple(getattr(exc, n) for n in ("RestartAnalysis", "SkipFrame") if hasattr(exc, n))


def static_eval(shape_env: Any, expr: Any) -> bool | None:
    """Decide a sympy relation from the ShapeEnv's ranges and replacements, adding no
    guard: True / False when it is known for every allowed size, None otherwise."""
    try:
        res = shape_env._maybe_evaluate_static(expr)
    except Exception:
        return None
    if res is None:
        return None
    import sympy

    if res == sympy.true:
        return True
    if res == sympy.false:
        return False
    return None


def always_decomposed(op: Any) -> bool:
    """An ATen op AOTAutograd always decomposes (CompositeImplicitAutograd with no
    autograd kernel of its own): it never reaches an ATen graph."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has(op.name(), "CompositeImplicitAutograd") and not has(op.name(), "Autograd")


def grad_mode_ops() -> set:
    """Graph targets that change grad mode inside a Dynamo graph."""
    return {torch._C._set_grad_enabled, torch.autograd.grad, torch.enable_grad}


def size_hint(shape_env: Any, expr: Any, fallback: int) -> int:
    """An example value of a size expression, with no guard; ``fallback`` (or, from
    torch 2.13, torch's own heuristic) for one of unbacked sizes.  (``size_hint`` is
    deprecated from 2.13, ``optimization_hint`` is not in 2.11.)"""
    optimization_hint = getattr(shape_env, "optimization_hint", None)
    if optimization_hint is not None:
        return int(optimization_hint(expr, fallback=fallback))
    h = shape_env.size_hint(expr, allow_none=True)
    return fallback if h is None else int(h)


def higher_order_op_name(target: Any) -> str | None:
    """A higher-order op's name (``"cond"``, ``"invoke_subgraph"``, ...), else None."""
    return target.name() if isinstance(target, torch._ops.HigherOrderOperator) else None


def is_higher_order_op(target: Any) -> bool:
    """``target`` is a higher-order op (a custom ``autograd.Function``'s
    ``autograd_function_apply``, a checkpointed region, ``cond``, ...)."""
    return isinstance(target, torch._ops.HigherOrderOperator)


def fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


# --- pre-autograd graph cache (private) -------------------------------------------------


def trace_state() -> tuple:
    """Global state AOTAutograd's trace reads besides the graph and its inputs:
    autocast per device, deterministic algorithms, the SDPA backends, functorch config."""
    autocast = []
    for dev in ("cpu", "cuda", "xpu"):
        try:
            if torch.is_autocast_enabled(dev):
                autocast.append((dev, str(torch.get_autocast_dtype(dev))))
        except (RuntimeError, AttributeError):  # (a device type this build lacks)
            pass
    sdpa = tuple(
        bool(getattr(torch.backends.cuda, f, lambda: None)())
        for f in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled")
    )
    try:
        functorch = torch._functorch.config.save_config()
    except Exception:  # (the probe is best effort: a missing piece only widens the key)
        functorch = b""
    return (
        torch.__version__,
        tuple(autocast),
        torch.are_deterministic_algorithms_enabled(),
        sdpa,
        functorch,
    )


def is_plain_tensor(x: Any) -> bool:
    """A tensor that is not a traceable wrapper subclass (DTensor and the like)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return isinstance(x, torch.Tensor) and not is_traceable_wrapper_subclass(x)


def storage_ref(x: torch.Tensor) -> Any:
    """A hashable reference to ``x``'s storage (equal for views of one storage)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(x.untyped_storage())


def is_core_op(target: Any) -> bool:
    """An ATen / prims op (not a user's custom op or a higher-order op)."""
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and (
        str(target).split(".")[0] in ("aten", "prims")
    )


def cuobjdump_path() -> str | None:
    """The ``cuobjdump`` Triton ships with its NVIDIA backend (``triton.knobs``, triton
    3.3+), or None.  Reads a cubin's register and local-memory use without a GPU."""
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def has_device_tma() -> bool:
    """Whether this Triton builds TMA descriptors in a kernel (``tl.make_tensor_descriptor``:
    triton >= 3.4; the interpreter runs them too)."""
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor")


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_triton_allocator() -> None:
    """Give Triton an allocator for the global scratch a kernel that builds TMA descriptors
    needs (128 bytes a program, allocated by each launch), unless one is set already in
    this context (Triton keeps it in a ContextVar: a new thread starts without one)."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def cublas_allow_tf32() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32`` without its Python ``__getattr__`` (read
    on every fp32 GEMM call), and without its error when a program set TF32 through both
    the legacy flag and ``fp32_precision`` (then the newer setting holds)."""
    try:
        return bool(torch._C._get_cublas_allow_tf32())
    except RuntimeError:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
