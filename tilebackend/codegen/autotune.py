"""What is tuned (``Config``) and how one is picked for a launch.

Per kernel and per shape bucket: in interpreter mode, or with ``autotune="off"``, the
heuristic config is used and nothing is timed (timing the interpreter would be fake).
On a GPU every config of the (pruned) space is timed once per bucket with
``triton.testing.do_bench`` and the fastest is kept in memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from .. import settings
from .._compat import interpret_mode

log = logging.getLogger("tilebackend")


@dataclasses.dataclass(frozen=True)
class Config:
    """One point of a kernel's tuning space: constexpr block sizes plus launch options."""

    kwargs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 2, **kwargs: Any) -> Config:
        return Config(tuple(sorted(kwargs.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> Any:
        return dict(self.kwargs)[name]

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kernel[grid](..., **cfg.as_kwargs())``."""
        d = dict(self.kwargs)
        if not interpret_mode():
            d["num_warps"] = self.num_warps
            d["num_stages"] = self.num_stages
        return d

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"Config({inner}, num_warps={self.num_warps}, num_stages={self.num_stages})"


def bucket(n: int) -> int:
    """Power-of-two size bucket (0 and 1 are their own buckets)."""
    n = int(n)
    return 1 << max(n - 1, 0).bit_length() if n > 1 else n


_chosen: dict[tuple, Config] = {}


def select(
    kernel: str,
    key: tuple,
    configs: Sequence[Config],
    heuristic: Config,
    run: Callable[[Config], Any],
) -> Config:
    """Pick the config for ``kernel`` at ``key`` (dtype, shape bucket, flags)."""
    if interpret_mode() or settings.current().autotune == "off" or len(configs) <= 1:
        return heuristic
    full = (kernel, *key)
    hit = _chosen.get(full)
    if hit is not None:
        return hit
    import triton.testing

    best, best_ms = heuristic, float("inf")
    for cfg in configs:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
        except Exception as e:  # a config that does not compile is skipped
            log.debug("config %s of %s failed: %s", cfg, kernel, e)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _chosen[full] = best
    log.info("tuned %s %s -> %s (%.4f ms)", kernel, key, best, best_ms)
    return best
