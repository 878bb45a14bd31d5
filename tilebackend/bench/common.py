"""What every benchmark shares: providers, timing, ceilings, errors and the time budget."""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

#: provider name -> what it is.  "tile" uses Inductor for the graph parts our kernels do
#: not cover (what ``backend="tile"`` does on a GPU), "tile_eager" runs them as ATen.
PROVIDERS: dict[str, str] = {
    "eager": "plain PyTorch",
    "inductor": "torch.compile (default mode)",
    "inductor_max_autotune": 'torch.compile(mode="max-autotune")',
    "tile": 'torch.compile(backend="tile", options={"fallback": "inductor"})',
    "tile_eager": 'torch.compile(backend="tile", options={"fallback": "eager"})',
    "inductor_cudagraphs": 'torch.compile(mode="reduce-overhead") (CUDA graphs)',
    "tile_cudagraphs": 'torch.compile(backend="tile", mode="reduce-overhead") (CUDA graphs)',
}
#: providers that compile for a long time (skipped first when the time budget runs low)
HEAVY = {"inductor_max_autotune"}


def log(msg: str) -> None:
    """A progress line."""
    print(f"[bench] {msg}", flush=True)


def check_providers(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in PROVIDERS]
    if bad:
        raise ValueError(f"unknown provider(s) {bad}; choose from {list(PROVIDERS)}")
    return names


def compile_provider(provider: str, obj: Any, tile_options: dict | None = None):
    """``obj`` (a function or module) prepared for ``provider``.

    Returns ``(callable, tile_backend_or_None)``; the TileBackend holds the report of
    what was replaced.  Dynamo is reset first, so every provider compiles from scratch.
    """
    if provider == "eager":
        return obj, None
    torch._dynamo.reset()
    if provider == "inductor":
        return torch.compile(obj, dynamic=False), None
    if provider == "inductor_max_autotune":
        return torch.compile(obj, mode="max-autotune", dynamic=False), None
    if provider == "inductor_cudagraphs":
        return torch.compile(obj, mode="reduce-overhead", dynamic=False), None
    if provider in ("tile", "tile_eager", "tile_cudagraphs"):
        from ..backend import TileBackend

        options = dict(tile_options or {})
        options["fallback"] = "eager" if provider == "tile_eager" else "inductor"
        mode = "reduce-overhead" if provider == "tile_cudagraphs" else None
        backend = TileBackend(mode=mode, options=options)
        return torch.compile(obj, backend=backend, dynamic=False), backend
    raise ValueError(f"unknown provider {provider!r}")


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Timing:
    """How long to time each case: ``do_bench``'s warmup/rep on a GPU (milliseconds of
    running), plain repetitions on CPU (where the kernels run in Triton's interpreter and
    the numbers only check that the harness works)."""

    def __init__(self, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3) -> None:
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.cpu_reps = cpu_reps

    def median_ms(self, fn: Callable[[], Any], device: str) -> float:
        if str(device).startswith("cuda"):
            import triton.testing

            return float(
                triton.testing.do_bench(
                    fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"
                )
            )
        if self.cpu_reps > 1:
            fn()  # warm up (the caller has already run it once)
        times = []
        for _ in range(max(1, self.cpu_reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def timed_first_call(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """Run ``fn`` once (a compile happens here) and return (result, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor to compare: a tensor, an HF ModelOutput's logits / last hidden state,
    or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def errors(out: Any, ref: Any) -> dict[str, float | None]:
    """``max_abs_err`` = max |out - ref|, ``rel_err`` = that / max |ref| (in fp32); over
    every result when both are tuples of tensors (q, k and v), else the first tensor's."""
    pairs = [(first_tensor(out), first_tensor(ref))]
    if isinstance(out, (list, tuple)) and isinstance(ref, (list, tuple)) and len(out) == len(ref):
        if all(isinstance(t, torch.Tensor) for t in (*out, *ref)):
            pairs = list(zip(out, ref))
    if any(a is None or b is None or a.shape != b.shape for a, b in pairs):
        return {"max_abs_err": None, "rel_err": None}
    diff = max((a.float() - b.to(a.device).float()).abs().max().item() for a, b in pairs)
    scale = max(b.float().abs().max().item() for _, b in pairs)
    return {"max_abs_err": diff, "rel_err": diff / scale if scale else diff}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_ceilings(device: str, profile: str, timing: Timing, dtype: torch.dtype) -> list[dict]:
    """The ceilings the roofline % is taken against, measured in this run: device copy
    bandwidth (a large ``copy_``; bytes read + written) and the bf16 matmul rate (an
    8192^3 ``mm``).  Rows named as in ``shared/anchors``."""
    rows = []
    n = 1 << 29 if profile == "anchor" else 1 << 14  # 1 GiB of bf16
    ms, moved = _copy_ms(n, device, timing)
    rows.append(_ceiling_row("ceiling.copy", ms, gbps=moved / ms / 1e6))
    m = 8192 if profile == "anchor" else 32
    mm_dtype = torch.bfloat16 if str(device).startswith("cuda") else dtype
    a = torch.randn(m, m, device=device, dtype=mm_dtype)
    b = torch.randn(m, m, device=device, dtype=mm_dtype)
    ms = timing.median_ms(lambda: torch.mm(a, b), device)
    name = "ceiling.mm8192" if m == 8192 else f"ceiling.mm{m}"
    rows.append(_ceiling_row(name, ms, tflops=2 * m**3 / ms / 1e9))
    return rows


def _copy_ms(n: int, device: str, timing: Timing) -> tuple[float, int]:
    """Time ``dst.copy_(src)`` of ``n`` bf16 elements; return (ms, bytes read + written)."""
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return timing.median_ms(lambda: dst.copy_(src), device), 2 * nbytes(src)


def _ceiling_row(name: str, ms: float, **rates: float) -> dict:
    row = {"suite": "ceiling", "name": name, "provider": "", "status": "ok", "ms": ms}
    row.update(rates)
    return row


def environment(device: str) -> dict[str, Any]:
    """Device and versions, for the results' ``meta``."""
    import triton

    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu (Triton interpreter)" if device == "cpu" else device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:
        env["transformers"] = None
    return env


class Budget:
    """A wall-clock deadline: work that would not fit is skipped (and recorded so)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if not seconds else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def skipped_row(base: dict, provider: str, why: str) -> dict:
    """``base`` (suite, name, ...) marked as skipped for ``provider``, with the reason."""
    return dict(base, provider=provider, status="skipped", error=why)


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
