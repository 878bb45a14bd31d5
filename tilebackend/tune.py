"""``tilebackend.tune(model, example_inputs, budget_s=...)``: tune ahead of time, ship the result.

Compiles ``model`` with the tile backend in ``max-autotune-no-cudagraphs`` mode (the
exhaustive search; tuning needs no CUDA graphs),
runs it once on ``example_inputs`` so that every kernel selection happens, and writes a
tuning artifact (see ``codegen.tuning_cache``) that another process, or another machine
with the same GPU and versions, loads with ``options={"tuning": path}``.  A progress bar
on stderr starts with an estimate once the graphs are compiled (the number of kernel
sites times the per-search budget, capped by ``budget_s``).

In interpreter mode (``TRITON_INTERPRET=1``) nothing is timed: the artifact holds the
heuristic configs, marked ``"timed": false``, for the device ``"interpreter"``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import torch

from . import settings
from ._compat import interpret_mode
from .fx_passes.verify import rng_state, set_rng_state

__all__ = ["tune"]


class _Progress:
    """A plain stderr progress bar (no tqdm)."""

    def __init__(self, stream: TextIO | None, per_search_s: float, budget_s: float | None):
        self.stream = stream
        self.per_search_s = per_search_s
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        self.total = 0
        self.done = 0
        self.started = False

    def estimate(self, sites: int) -> float:
        if interpret_mode():
            return 0.0
        est = sites * self.per_search_s
        return min(est, self.budget_s) if self.budget_s is not None else est

    def update(self, sites: int, decision: Any) -> None:
        self.done += 1
        self.total = max(self.total, sites, self.done)
        if self.stream is None:
            return
        if not self.started:
            self.started = True
            timing = (
                "interpreter mode: nothing is timed"
                if interpret_mode()
                else f"estimate <= {self.estimate(self.total):.0f} s"
            )
            self.stream.write(
                f"[tilebackend tune] {self.total} kernel site(s) to select for; {timing}\n"
            )
        self._draw(f"{decision.kernel}: {decision.source}")

    def _draw(self, what: str) -> None:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        el = time.monotonic() - self.t0
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {el:6.1f}s  {what[:40]:<40}")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.started:
            self.total = self.done
            self._draw("done")
            self.stream.write("\n")
            self.stream.flush()


def tune(
    model: Any,
    example_inputs: Any,
    budget_s: float | None = None,
    *,
    out: str | os.PathLike = "tilebackend-tuning.json",
    mode: str = "max-autotune-no-cudagraphs",
    options: Mapping[str, Any] | None = None,
    backward: bool = False,
    progress: bool = True,
) -> dict:
    """Tune every kernel ``model`` uses on ``example_inputs``; write the artifact to ``out``.

    ``example_inputs``: a tensor or a tuple/list of positional arguments.  ``budget_s``
    caps the whole run (each search also stays within ``options["tune_budget_s"]``);
    ``backward=True`` also runs a backward pass (of ``output.sum()``) to tune the backward
    kernels; the ``.grad`` of the model's parameters and of the inputs, the model's
    buffers (BatchNorm's running statistics) and the random generators are left as they
    were.  Returns the artifact's JSON object (``"entries"`` etc.) plus ``"path"``.
    Under ``torch.distributed`` rank 0 tunes and writes; the other ranks receive.
    """
    from .backend import TileBackend
    from .codegen import autotune, tuning_cache

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    backend = TileBackend(mode=mode, options=dict(options or {}))
    s = backend.settings
    per_search = s.tune_budget_s if s.search == "exhaustive" else autotune.QUICK_BUDGET_S
    bar = _Progress(sys.stderr if progress else None, per_search, budget_s)
    seen: list[Any] = []

    def sites() -> int:
        return sum(len(g.replacements) for g in backend.report.graphs)

    def observe(d: Any) -> None:
        seen.append(d)
        bar.update(sites(), d)

    autotune.reset()  # every selection is made (and seen) again
    autotune.observers.append(observe)
    # (a tuning run is not a training step: buffers such as BatchNorm's running
    # statistics, and the random generators, are put back as they were)
    buffers = list(model.buffers()) if isinstance(model, torch.nn.Module) else []
    saved_buffers = [b.detach().clone() for b in buffers]
    rng = rng_state()
    try:
        compiled = torch.compile(model, backend=backend)
        # the backend's settings must also be in force when the kernels run
        with settings.use(s), autotune.deadline(budget_s):
            if backward:
                leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
                if isinstance(model, torch.nn.Module):
                    leaves += [p for p in model.parameters() if p.requires_grad]
                grads = [t.grad for t in leaves]
                try:
                    result = compiled(*args)
                    outs = [t for t in _flat(result) if t.requires_grad]
                    if outs:
                        torch.autograd.backward([t.sum() for t in outs])
                finally:  # (a tuning run is not a training step)
                    for t, g in zip(leaves, grads):
                        t.grad = g
            else:
                with torch.no_grad():
                    compiled(*args)
    finally:
        autotune.observers.remove(observe)
        bar.close()
        with torch.no_grad():
            for b, v in zip(buffers, saved_buffers):
                b.copy_(v)
        set_rng_state(rng)

    entries = [
        {
            "kernel": d.kernel,
            "key": d.cache_key.key,
            "source": d.cache_key.source,
            **d.entry(),
        }
        for d in seen
        if d.cache_key is not None
    ]
    env = tuning_cache.environment()
    data: dict[str, Any]
    if autotune._rank() in (None, 0):
        data = tuning_cache.save_artifact(out, env, entries)
    else:
        data = {"entries": entries, **env}
    data["path"] = os.fspath(out)
    return data


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    return []
