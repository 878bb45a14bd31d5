"""What is tuned (``Config``) and how one is picked for a launch (``select``).

Per kernel and per key (dtype, shape bucket, flags), in this order:

1. ``autotune="off"``: the heuristic config, nothing timed.
2. A tuning artifact (``options={"tuning": path}``) made on this device with these
   versions and this kernel source: its config (also in interpreter mode, so the path is
   testable without a GPU).
3. Interpreter mode (``TRITON_INTERPRET=1``): the heuristic config.  Timing the
   interpreter would be fake, so nothing is timed or cached; this is logged once and
   recorded in the ``Decision``.
4. GPU: this process's earlier choice; else the on-disk cache (``tuning_cache``); else a
   search, whose result is cached.  Search ``"quick"`` (default) times the heuristic
   config and its nearest neighbours (at most ``QUICK_MAX_CANDIDATES`` configs and
   ``QUICK_BUDGET_S`` seconds), compiled first on parallel threads (:func:`precompile`);
   ``"exhaustive"`` (``mode="max-autotune"``) times every config of the pruned space
   when it has at most ``EXHAUSTIVE_LIMIT``, else random samples followed by a local
   search around the best, within ``tune_budget_s``.
   The heuristic config is always timed first and a candidate wins only when it is
   strictly faster; a candidate whose outputs differ from the heuristic's (allclose at
   the dtype's tolerance), or whose kernel spills more than ``SPILL_LIMIT`` registers,
   is rejected before its time counts.  Times are medians of
   ``triton.testing.do_bench`` (which flushes L2 between repeats); ``rotate=`` adds launch
   closures over copies of the inputs to cycle through.  Under an initialised
   ``torch.distributed`` group rank 0 decides and broadcasts the config; other ranks
   neither time nor read the cache.

Every choice is recorded in ``decisions`` (``Decision``: config, where it came from, and
why); ``observers`` are called with each new decision (``tilebackend.tune`` uses this).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import settings
from .._compat import interpret_mode
from . import _common, plans, tuning_cache

log = logging.getLogger("tilebackend")

QUICK_MAX_CANDIDATES = 4  # the heuristic config + 3 neighbours
#: a config with this parameter runs a library kernel instead of ours (a baseline)
EXTERN = "EXTERN"
QUICK_BUDGET_S = 2.0
EXHAUSTIVE_LIMIT = 32  # spaces up to this size are timed in full by "exhaustive"
#: a candidate whose kernel spills more 4-byte registers a thread than this is rejected
#: untimed (Inductor's ``spill_threshold`` is 16 too); the heuristic config never is
SPILL_LIMIT = 16
#: threads that compile a search's candidates before it times them, unless the
#: ``compile_threads`` setting says otherwise (Triton's compiler and ptxas release the
#: GIL: 4 bf16 GEMM configs for sm_90 compile in 4.7 s on 2 threads against 7.9 s one
#: after another, on a 2-core CPU)
COMPILE_WORKERS = min(8, os.cpu_count() or 1)
PRECOMPILE_WAIT_S = 300.0  # then the search goes on, compiling what is left as it times
_BENCH_ARGS = {"quick": (5, 25), "exhaustive": (10, 50)}  # do_bench warmup / rep (ms)


@dataclasses.dataclass(frozen=True)
class Config:
    """One point of a kernel's tuning space: constexpr block sizes plus launch options."""

    kwargs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 2
    _by_name: dict[str, Any] = dataclasses.field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self._by_name.update(self.kwargs)

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 2, **kwargs: Any) -> Config:
        return Config(tuple(sorted(kwargs.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> Any:
        return self._by_name[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._by_name.get(name, default)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kernel[grid](..., **cfg.as_kwargs())``."""
        d = dict(self._by_name)
        if not interpret_mode():
            d["num_warps"] = self.num_warps
            d["num_stages"] = self.num_stages
        return d

    def to_dict(self) -> dict[str, Any]:
        """JSON form (cache files and artifacts)."""
        return {
            "kwargs": dict(self.kwargs),
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        return Config.make(int(d["num_warps"]), int(d["num_stages"]), **d["kwargs"])

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"Config({inner}, num_warps={self.num_warps}, num_stages={self.num_stages})"


def bucket(n: int) -> int:
    """Power-of-two size bucket (0 and 1 are their own buckets)."""
    n = int(n)
    return 1 << max(n - 1, 0).bit_length() if n > 1 else n


@dataclasses.dataclass
class Decision:
    """How the config of one (kernel, key) was chosen."""

    kernel: str
    key: tuple
    config: Config
    #: "off" | "interpreter" | "single" | "artifact" | "cache" | "tuned" | "broadcast" | "fallback"
    source: str
    timed: bool
    reason: str = ""
    ms: float | None = None
    heuristic_ms: float | None = None
    tried: int = 0
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0
    search: str = ""
    cache_key: tuning_cache.CacheKey | None = None

    def entry(self) -> dict[str, Any]:
        """The JSON entry of a cache file / artifact."""
        return {
            "config": self.config.to_dict(),
            "ms": self.ms,
            "heuristic_ms": self.heuristic_ms,
            "timed": self.timed,
            "search": self.search,
            "tried": self.tried,
        }


#: The latest decision per (kernel, *key).
decisions: dict[tuple, Decision] = {}
#: Callables ``(decision) -> None`` told about every new decision.
observers: list[Callable[[Decision], None]] = []

_chosen: dict[tuple, Config] = {}
_deadline: list[float] = []  # time.monotonic() by which searches must end (tilebackend.tune)
_not_in_artifact: set[tuple] = set()
_noted: set[tuple] = set()
_said: set[str] = set()


def reset() -> None:
    """Forget this process's choices and decisions (tests)."""
    _chosen.clear()
    _not_in_artifact.clear()
    _noted.clear()
    _artifact_warned.clear()
    decisions.clear()


@contextlib.contextmanager
def deadline(budget_s: float | None) -> Iterator[None]:
    """Within the block, searches end ``budget_s`` seconds from now at the latest (the
    heuristic config is still timed, so a search past the deadline keeps it)."""
    if budget_s is None:
        yield
        return
    _deadline.append(time.monotonic() + budget_s)
    try:
        yield
    finally:
        _deadline.pop()


def _once(msg: str, *args: Any) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info(msg, *args)


def _record(d: Decision) -> Decision:
    decisions[(d.kernel, *d.key)] = d
    for fn in list(observers):
        try:
            fn(d)
        except Exception as e:  # an observer must not break a launch
            log.debug("autotune observer failed: %s", e)
    return d


def _note(kernel, key, cfg, source, reason, ck_of: Callable[[], Any]) -> None:
    """Record an untimed decision once per (kernel, key, source)."""
    ident = (kernel, *key, source)
    if ident in _noted:
        return
    _noted.add(ident)
    ck = ck_of() if observers else None  # the key costs a hash: only for tune()
    _record(Decision(kernel, tuple(key), cfg, source, False, reason, cache_key=ck))


def _cache_key(kernel: str, key: tuple, fn: Any, run: Callable) -> tuning_cache.CacheKey:
    src = tuning_cache.source_hash(fn if fn is not None else run)
    return tuning_cache.CacheKey.make(kernel, key, src, tuning_cache.environment())


def select(
    kernel: str,
    key: tuple,
    configs: Sequence[Config],
    heuristic: Config,
    run: Callable[[Config], Any],
    *,
    outputs: Callable[[], Sequence[Any]] | None = None,
    rotate: Sequence[Callable[[Config], Any]] = (),
    fn: Any = None,
) -> Config:
    """Pick the config for ``kernel`` at ``key`` (dtype, shape bucket, flags).

    ``run(cfg)`` launches the kernel with ``cfg``.  Optional: ``outputs()`` returns the
    tensors ``run`` writes (and only writes), checked against the heuristic config's
    before a candidate's time counts (else ``run``'s return value is checked, when it is
    tensors); ``rotate`` are more launch closures, over copies of the inputs, that timing
    cycles through; ``fn`` is the ``@triton.jit`` function(s) whose source keys the cache
    (default: the whole file ``run`` is defined in).
    """
    s = settings.current()
    if s.autotune == "off":
        _note(
            kernel,
            key,
            heuristic,
            "off",
            'autotune="off": heuristic config',
            lambda: _cache_key(kernel, key, fn, run),
        )
        return heuristic
    memo = (kernel, *key, s.search, s.tune_budget_s, s.tuning)
    hit = _chosen.get(memo)
    if hit is not None:
        return hit
    ck = None
    if s.tuning and memo not in _not_in_artifact:
        ck = _cache_key(kernel, key, fn, run)
        cfg = _from_artifact(s.tuning, ck, configs, heuristic)
        if cfg is not None:
            _chosen[memo] = cfg
            _record(
                Decision(
                    kernel, tuple(key), cfg, "artifact", False, f"from {s.tuning}", cache_key=ck
                )
            )
            return cfg
        _not_in_artifact.add(memo)
    if interpret_mode():
        _once("tilebackend: Triton interpreter: configs are not timed (heuristic configs)")
        _note(
            kernel,
            key,
            heuristic,
            "interpreter",
            "interpreter mode: nothing is timed; heuristic config",
            lambda: ck or _cache_key(kernel, key, fn, run),
        )
        return heuristic
    if len(configs) <= 1:
        _note(
            kernel,
            key,
            heuristic,
            "single",
            "one config: nothing to tune",
            lambda: ck or _cache_key(kernel, key, fn, run),
        )
        return heuristic
    ck = ck or _cache_key(kernel, key, fn, run)
    plans.not_replayable("it chose a config")  # (its timing launches are not the call's)
    payload = coordinate(
        lambda: _decide(kernel, key, ck, configs, heuristic, run, outputs, rotate, s)
    )
    if payload is None:  # rank 0 failed: every rank keeps the heuristic
        cfg, d = heuristic, None
    else:
        cfg, d = payload
    if d is None:
        d = Decision(kernel, tuple(key), cfg, "fallback", False, "tuning failed", cache_key=ck)
    elif _rank() not in (None, 0):
        d = dataclasses.replace(d, source="broadcast", reason="chosen by rank 0")
    _chosen[memo] = cfg
    _record(d)
    return cfg


def _decide(kernel, key, ck, configs, heuristic, run, outputs, rotate, s):
    """Rank 0 / single process: the disk cache, else a search (whose result is cached)."""
    cache = tuning_cache.get_cache()
    entry = cache.get(ck)
    if entry is not None and (s.search != "exhaustive" or entry.get("search") == "exhaustive"):
        cfg = _usable(entry, configs, heuristic)
        if cfg is not None:
            d = Decision(
                kernel,
                tuple(key),
                cfg,
                "cache",
                False,
                f"from the tuning cache {cache.root}",
                ms=entry.get("ms"),
                heuristic_ms=entry.get("heuristic_ms"),
                search=str(entry.get("search", "")),
                cache_key=ck,
            )
            return cfg, d
    budget = s.tune_budget_s if s.search == "exhaustive" else min(s.tune_budget_s, QUICK_BUDGET_S)
    if _deadline:
        budget = max(0.0, min(budget, _deadline[-1] - time.monotonic()))
    t0 = time.monotonic()
    res = search(
        configs,
        heuristic,
        run,
        strategy=s.search,
        budget_s=budget,
        outputs=outputs,
        rotate=rotate,
        seed=int(ck.digest()[:8], 16),
        compile_workers=s.compile_threads or COMPILE_WORKERS,
    )
    d = Decision(
        kernel,
        tuple(key),
        res.best,
        "tuned",
        True,
        f"{s.search} search over {len(configs)} config(s), {res.tried} timed",
        ms=res.best_ms,
        heuristic_ms=res.heuristic_ms,
        tried=res.tried,
        rejected={str(c): why for c, why in res.rejected.items()},
        elapsed_s=time.monotonic() - t0,
        search=s.search,
        cache_key=ck,
    )
    if res.best_ms is not None:
        cache.put(ck, d.entry())
    log.info(
        "tuned %s %s -> %s (%.4f ms; heuristic %s ms; %d timed, %.1f s)",
        kernel,
        key,
        res.best,
        res.best_ms or float("nan"),
        f"{res.heuristic_ms:.4f}" if res.heuristic_ms is not None else "-",
        res.tried,
        d.elapsed_s,
    )
    return res.best, d


def _usable(entry: dict, configs: Sequence[Config], heuristic: Config) -> Config | None:
    """The entry's config if it is still one of this kernel's configs."""
    try:
        cfg = Config.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError):
        return None
    return cfg if cfg == heuristic or cfg in configs else None


_artifact_warned: set = set()


def _from_artifact(path: str, ck, configs, heuristic) -> Config | None:
    art = tuning_cache.load_artifact(path)
    why = art.mismatch(ck.env)
    if why:
        _artifact_warn(
            (path,),
            f"tilebackend: tuning artifact {path!r} was made for another setup ({why}); "
            "not using it",
        )
        return None
    entry = art.lookup(ck)
    if entry is None:
        if art.other_sources(ck):
            _artifact_warn(
                (path, ck.kernel, "source"),
                f"tilebackend: tuning artifact {path!r}: its {ck.kernel!r} entries were tuned "
                "for another version of that kernel's source (it changed since the artifact "
                "was made); not using them (re-run `python -m tilebackend tune`)",
            )
        else:  # (a shape bucket or dtype the artifact was not tuned for: tuned here)
            log.info("tuning artifact %s has no entry for %s %s", path, ck.kernel, ck.key)
        return None
    cfg = _usable(entry, configs, heuristic)
    if cfg is None:
        _artifact_warn(
            (path, ck.kernel, "config"),
            f"tilebackend: tuning artifact {path!r}: its {ck.kernel!r} config "
            f"{entry.get('config')!r} is not one of that kernel's configs; not using it",
        )
    return cfg


def _artifact_warn(key: tuple, msg: str) -> None:
    import warnings

    if key not in _artifact_warned:
        _artifact_warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


# --- distributed ------------------------------------------------------------------------


def _dist():
    """``torch.distributed`` when a process group of more than one rank is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _rank() -> int | None:
    d = _dist()
    return d.get_rank() if d is not None else None


def coordinate(decide: Callable[[], Any], dist: Any = None) -> Any:
    """Run ``decide()`` on rank 0 only and broadcast its (picklable) result to every rank.

    Without an initialised multi-rank group it is just ``decide()``.  If ``decide`` raises
    on rank 0, every rank gets None (and keeps its heuristic), so no rank waits forever.
    """
    dist = dist if dist is not None else _dist()
    if dist is None:
        return decide()
    obj: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            obj[0] = decide()
        except Exception as e:
            log.warning("autotune on rank 0 failed (%s); every rank keeps the heuristic", e)
            obj[0] = None
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


# --- search -----------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
    best: Config
    best_ms: float | None
    heuristic_ms: float | None
    timings: dict[Config, float]
    rejected: dict[Config, str]

    @property
    def tried(self) -> int:
        return len(self.timings)


def _numeric_params(cfg: Config) -> dict[str, Any]:
    return {**dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def distance(a: Config, b: Config) -> float:
    """How far apart two configs are: sum over parameters of |log2 a - log2 b| (numbers)
    or 1 (other values differing)."""
    pa, pb = _numeric_params(a), _numeric_params(b)
    total = 0.0
    for k in pa.keys() | pb.keys():
        x, y = pa.get(k), pb.get(k)
        if x == y:
            continue
        if (
            isinstance(x, (int, float))
            and isinstance(y, (int, float))
            and not isinstance(x, bool)
            and not isinstance(y, bool)
            and x > 0
            and y > 0
        ):
            total += abs(math.log2(x) - math.log2(y))
        else:
            total += 1.0
    return total


def neighbours(cfg: Config, configs: Sequence[Config], k: int | None = None) -> list[Config]:
    """``configs`` other than ``cfg``, nearest first (ties keep the space's order)."""
    others = [c for c in configs if c != cfg]
    others.sort(key=lambda c: distance(cfg, c))
    return others if k is None else others[:k]


def tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol) for comparing two configs' outputs: loose enough for a different
    accumulation order, tight enough to catch wrong or unwritten results."""
    import torch

    return {
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (5e-2, 5e-2),
        torch.float32: (1e-3, 1e-3),
    }.get(dtype, (1e-3, 1e-3))


def _tensors(x: Any) -> list[Any]:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _same(ref: list[Any], got: list[Any]) -> str | None:
    """None when ``got`` matches ``ref``, else why not."""
    import torch

    if len(ref) != len(got):
        return f"{len(got)} outputs, the heuristic config gave {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape or r.dtype != g.dtype:
            return f"output {i} is {tuple(g.shape)} {g.dtype}, expected {tuple(r.shape)} {r.dtype}"
        if not r.dtype.is_floating_point:
            if not torch.equal(r, g):
                return f"output {i} differs"
            continue
        rtol, atol = tolerance(r.dtype)
        rf, gf = r.float(), g.float()
        finite = rf[torch.isfinite(rf)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        if not torch.allclose(gf, rf, rtol=rtol, atol=atol * scale, equal_nan=True):
            err = (gf - rf).abs().nan_to_num(float("inf")).max().item()
            return f"output {i} differs from the heuristic config's (max abs diff {err:.3g})"
    return None


def _do_bench(fn: Callable[[], Any], strategy: str) -> float:
    import triton.testing

    warmup, rep = _BENCH_ARGS.get(strategy, _BENCH_ARGS["quick"])
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def search(
    configs: Sequence[Config],
    heuristic: Config,
    run: Callable[[Config], Any],
    *,
    strategy: str = "quick",
    budget_s: float = QUICK_BUDGET_S,
    outputs: Callable[[], Sequence[Any]] | None = None,
    rotate: Sequence[Callable[[Config], Any]] = (),
    bench: Callable[[Callable[[], Any]], float] | None = None,
    clock: Callable[[], float] = time.monotonic,
    seed: int = 0,
    max_candidates: int = QUICK_MAX_CANDIDATES,
    compile_workers: int = 0,
) -> SearchResult:
    """Time candidates of ``configs`` against ``heuristic`` (see the module docstring).

    ``bench(fn) -> ms`` defaults to the median of ``triton.testing.do_bench``; ``clock``
    is the time source of the budget (both replaceable in tests).  The heuristic config
    is always timed, even with no budget left.  With ``compile_workers`` > 1, the
    candidates of a fixed list (quick, or a small exhaustive space) are first compiled by
    that many threads (:func:`precompile`).
    """
    if bench is None:
        bench = lambda f: _do_bench(f, strategy)  # noqa: E731
    deadline = clock() + budget_s
    space = list(dict.fromkeys([heuristic, *configs]))
    runs = [run, *rotate]
    timings: dict[Config, float] = {}
    rejected: dict[Config, str] = {}
    state: dict[str, Any] = {"ref": None}

    def measure(cfg: Config) -> float | None:
        try:
            outs = list(outputs()) if outputs is not None else None
            for t in outs or ():
                if t.dtype.is_floating_point:
                    t.fill_(float("nan"))  # an element the candidate forgets is caught
            with _common.watch_launches() as compiled:
                ret = run(cfg)  # compiles, and gives the outputs to check
            spills = max((getattr(k, "n_spills", 0) or 0 for k in compiled), default=0)
            if spills > SPILL_LIMIT and cfg != heuristic:
                rejected[cfg] = f"spills {spills} registers a thread (limit {SPILL_LIMIT})"
                log.debug("config %s rejected: %s", cfg, rejected[cfg])
                return None
            got = [t.clone() for t in (_tensors(outs) if outs is not None else _tensors(ret))]
            if state["ref"] is None:
                state["ref"] = got
            else:
                bad = _same(state["ref"], got)
                if bad:
                    rejected[cfg] = bad
                    log.debug("config %s rejected: %s", cfg, bad)
                    return None
            it = itertools.cycle(runs)
            ms = float(bench(lambda: next(it)(cfg)))
        except Exception as e:  # a config that does not compile or launch is skipped
            rejected[cfg] = f"{type(e).__name__}: {e}"
            log.debug("config %s failed: %s", cfg, e)
            return None
        if not math.isfinite(ms):
            rejected[cfg] = f"non-finite time {ms}"
            return None
        timings[cfg] = ms
        return ms

    def best() -> Config | None:
        return min(timings, key=lambda c: (timings[c], c != heuristic)) if timings else None

    # baselines (a config with EXTERN, e.g. cuBLAS for a plain GEMM) are timed first,
    # whatever the strategy: the pick is then never slower than them
    baselines = [c for c in space if c != heuristic and c.get(EXTERN) is not None]
    rest = [c for c in space if c != heuristic and c.get(EXTERN) is None]
    if strategy == "quick":
        fixed = neighbours(heuristic, rest, max(max_candidates - 1, 0))
    elif len(space) <= EXHAUSTIVE_LIMIT:
        fixed = neighbours(heuristic, rest)
    else:
        fixed = None  # sampled, then chosen around the best so far
    if compile_workers > 1:
        precompile(run, [heuristic, *(fixed or ())], compile_workers)
    h_ms = measure(heuristic)
    if fixed is not None:
        order: Any = iter(fixed)
    else:
        order = _sample_then_local(heuristic, rest, random.Random(seed), best)
    order = itertools.chain(baselines, order)
    for cfg in order:
        if clock() >= deadline:
            break
        if cfg not in timings and cfg not in rejected:
            measure(cfg)

    winner = best()
    if winner is None:
        return SearchResult(heuristic, None, h_ms, timings, rejected)
    if h_ms is not None and not timings[winner] < h_ms:
        winner = heuristic  # a candidate must be strictly faster than the heuristic
    return SearchResult(winner, timings[winner], h_ms, timings, rejected)


def precompile(run: Callable[[Config], Any], configs: Sequence[Config], workers: int) -> None:
    """Compile ``run``'s kernels for each of ``configs`` on ``workers`` threads, running
    nothing (:func:`._common.compile_only`); the timing that follows finds them in
    Triton's cache.  A config that fails here is left for the timing to reject."""
    if len(configs) < 2 or interpret_mode():
        return
    import torch

    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def one(cfg: Config) -> None:
        try:
            if device is not None:  # (a new thread starts on device 0)
                torch.cuda.set_device(device)
            with _common.compile_only():
                run(cfg)
        except Exception as e:  # measure() reports it
            log.debug("precompiling %s failed: %s", cfg, e)

    pool = ThreadPoolExecutor(min(workers, len(configs)), thread_name_prefix="tile-compile")
    try:  # (a compile still running after the wait is left to finish on its own)
        concurrent.futures.wait([pool.submit(one, c) for c in configs], PRECOMPILE_WAIT_S)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _sample_then_local(heuristic, rest, rng: random.Random, best: Callable[[], Config | None]):
    """Random samples (a quarter of the space, at least 8), then the neighbours of the
    best config so far, until no untried neighbour is left."""
    n = min(len(rest), max(8, len(rest) // 4))
    sampled = rng.sample(rest, n)
    yield from sampled
    seen = {heuristic, *sampled}
    while True:
        centre = best() or heuristic
        nxt = [c for c in neighbours(centre, rest, 4) if c not in seen]
        if not nxt:
            return
        for c in nxt:
            seen.add(c)
            yield c
