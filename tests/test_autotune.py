"""Autotuning: modes, the search, the persistent cache, tuning artifacts, ``tilebackend.tune``.

Everything here runs on CPU without timing anything real: the cache and artifact code
is exercised directly with fake entries, the GPU search path with a fake ``bench``/clock
(or with ``interpret_mode`` patched off and ``do_bench`` faked).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import pytest
import torch

import tilebackend
from tilebackend import settings
from tilebackend.codegen import autotune, matmul, tuning_cache
from tilebackend.codegen.autotune import Config
from tilebackend.exc import InvalidOptionValueError, TuningArtifactError

ENV = {"device": "interpreter", "torch": torch.__version__, "triton": "3.x"}


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """A private cache folder and no remembered choices, for every test."""
    monkeypatch.setenv("TILEBACKEND_CACHE_DIR", str(tmp_path / "cache"))
    autotune.reset()
    tuning_cache._caches.clear()
    yield
    autotune.reset()
    tuning_cache._caches.clear()


def ck(kernel="k", key=(torch.float16, 64, True), source="s0", **env):
    return tuning_cache.CacheKey.make(kernel, key, source, {**ENV, **env})


def entry(bm=64, ms=1.0):
    return {"config": Config.make(4, 3, BLOCK_M=bm).to_dict(), "ms": ms, "search": "quick"}


def recorded():
    """``warnings.catch_warnings(record=True)`` (call ``simplefilter("always")`` inside)."""
    return warnings.catch_warnings(record=True)


# --- the cache ----------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    c = tuning_cache.TuningCache(tmp_path / "c")
    k = ck()
    assert c.get(k) is None
    c.put(k, entry(128))
    assert c.get(k)["config"]["kwargs"] == {"BLOCK_M": 128}
    fresh = tuning_cache.TuningCache(tmp_path / "c")  # another process: from disk
    got = fresh.get(k)
    assert Config.from_dict(got["config"]) == Config.make(4, 3, BLOCK_M=128)
    files = list((tmp_path / "c").rglob("*"))
    assert [f.name for f in files if f.is_file()] == [c.path(k).name]  # no temp file left


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TILEBACKEND_CACHE_DIR", str(tmp_path / "x"))
    assert tuning_cache.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TILEBACKEND_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning_cache.default_cache_dir() == tmp_path / "xdg" / "tilebackend"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(tuning_cache.default_cache_dir()).endswith(os.path.join(".cache", "tilebackend"))


def test_cache_corrupt_files_ignored_with_one_warning(tmp_path):
    c = tuning_cache.TuningCache(tmp_path)
    keys = [ck(source=f"s{i}") for i in range(4)]
    c.dir.mkdir(parents=True)
    good = json.dumps(
        {"format": tuning_cache.FORMAT_VERSION, "key": keys[0].as_dict(), "entry": entry()}
    )
    c.path(keys[0]).write_bytes(b"\x00\xffgarbage")
    c.path(keys[1]).write_text(good[: len(good) // 2])  # truncated
    c.path(keys[2]).write_text(good.replace('"format": 1', '"format": 999'))  # other version
    c.path(keys[3]).write_text(json.dumps({"format": 1, "key": keys[0].as_dict(), "entry": {}}))
    with recorded() as w:
        warnings.simplefilter("always")
        assert all(c.get(k) is None for k in keys)
    assert len(w) == 1 and "ignoring tuning cache file" in str(w[0].message)
    c.put(keys[1], entry(32))  # a corrupt file is simply replaced
    assert tuning_cache.TuningCache(tmp_path).get(keys[1])["config"]["kwargs"] == {"BLOCK_M": 32}


def test_cache_read_only_dir_degrades_to_memory(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    (root / f"v{tuning_cache.FORMAT_VERSION}").mkdir(parents=True)
    os.chmod(root / f"v{tuning_cache.FORMAT_VERSION}", 0o555)
    os.chmod(root, 0o555)
    try:
        if os.access(root / f"v{tuning_cache.FORMAT_VERSION}", os.W_OK):  # root ignores modes

            def denied(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tuning_cache.tempfile, "mkstemp", denied)
        c = tuning_cache.TuningCache(root)
        with recorded() as w:
            warnings.simplefilter("always")
            c.put(ck(source="a"), entry(16))
            c.put(ck(source="b"), entry(32))
        assert len(w) == 1 and "cannot be written" in str(w[0].message)
        assert not c.writable
        assert c.get(ck(source="a"))["config"]["kwargs"] == {"BLOCK_M": 16}
        assert c.get(ck(source="b"))["config"]["kwargs"] == {"BLOCK_M": 32}
    finally:
        os.chmod(root, 0o755)
        os.chmod(root / f"v{tuning_cache.FORMAT_VERSION}", 0o755)


def _writer(root: str, worker: int, rounds: int) -> None:
    c = tuning_cache.TuningCache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any corrupt read fails the process
        for r in range(rounds):
            for i in range(8):
                k = ck(source=f"s{i}")
                c.put(k, entry(bm=16 * (worker + 1), ms=float(r)))
                c.clear_memory()
                got = c.get(k)
                assert got is not None and tuning_cache.valid_entry(got)


def test_cache_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    c = tuning_cache.TuningCache(tmp_path)
    with recorded() as w:
        warnings.simplefilter("always")
        for i in range(8):
            assert c.get(ck(source=f"s{i}"))["config"]["kwargs"]["BLOCK_M"] in (16, 32, 48)
    assert not w
    assert not [f for f in c.dir.iterdir() if f.name.endswith(".tmp")]


def test_key_invalidation(tmp_path):
    c = tuning_cache.TuningCache(tmp_path)
    base = ck()
    c.put(base, entry())
    assert c.get(ck()) is not None
    changed = [
        ck(source="s1"),
        ck(torch="9.9"),
        ck(triton="9.9"),
        ck(device="NVIDIA H100 sm90"),
        ck(key=(torch.float16, 128, True)),
        ck(key=(torch.bfloat16, 64, True)),
        ck(key=(torch.float16, 64, False)),
        ck(kernel="other"),
    ]
    assert len({k.digest() for k in changed} | {base.digest()}) == len(changed) + 1
    fresh = tuning_cache.TuningCache(tmp_path)
    assert all(fresh.get(k) is None for k in changed)


def test_source_hash():
    fn = matmul._matmul_kernel  # InterpretedFunction here, JITFunction on a GPU
    import hashlib
    import inspect

    assert (
        tuning_cache.source_hash(fn)
        == hashlib.sha256(inspect.getsource(fn.fn).encode()).hexdigest()[:16]
    )
    x = 1
    closure = lambda cfg: x  # noqa: E731
    with open(__file__, "rb") as f:
        assert tuning_cache.source_hash(closure) == hashlib.sha256(f.read()).hexdigest()[:16]
    assert tuning_cache.source_hash((fn, closure)) != tuning_cache.source_hash(fn)


# --- pruning ------------------------------------------------------------------------------


MM_VARIANTS = [
    (torch.float16, "tf32"),
    (torch.bfloat16, "tf32"),
    (torch.float32, "tf32"),
    (torch.float32, "ieee"),
]


def _pruning_violations(dtype, precision, shapes):
    space = matmul.config_space(dtype, precision)
    smallest = {b: min(c[b] for c in space) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    bad = []
    for m, n, k in shapes:
        kept = matmul.prune_configs(space, m, n, k)
        assert kept and all(c in space for c in kept)
        for c in kept:
            for blk, size in (("BLOCK_M", m), ("BLOCK_N", n), ("BLOCK_K", k)):
                if c[blk] > max(autotune.bucket(size), smallest[blk]):
                    bad.append((m, n, k, str(c)))
    return bad


@pytest.mark.parametrize("dtype,precision", MM_VARIANTS)
def test_matmul_pruning(dtype, precision):
    """Every config pruned in keeps BLOCK_X <= max(next_pow2(X), smallest BLOCK_X)."""
    shapes = [(100, 3000, 17), (4096, 4096, 4096), (33, 65, 129), (64, 64, 64)]
    assert _pruning_violations(dtype, precision, shapes) == []
    space = matmul.config_space(dtype, precision)
    assert matmul.prune_configs(space, 4096, 4096, 4096) == space
    assert matmul.prune_configs([], 8, 8, 8) == []


@pytest.mark.parametrize("dtype,precision", MM_VARIANTS[:3])
def test_matmul_pruning_tiny_shapes(dtype, precision):
    assert (
        _pruning_violations(dtype, precision, [(1, 1, 1), (5, 7, 3), (16, 64, 16), (1, 4096, 64)])
        == []
    )


# --- the search (fake timings) --------------------------------------------------------------


def space(n):
    return [Config.make(4, 2, BLOCK=16 * (i + 1)) for i in range(n)]


def test_search_exhaustive_small_space_times_everything():
    cfgs = space(6)
    times = {c: 10.0 - i for i, c in enumerate(cfgs)}
    current = {}
    res = autotune.search(
        cfgs,
        cfgs[0],
        lambda c: current.__setitem__("c", c),
        strategy="exhaustive",
        budget_s=100,
        bench=lambda f: (f(), times[current["c"]])[1],
    )
    assert res.tried == 6 and res.best == cfgs[-1] and res.heuristic_ms == 10.0


def test_search_quick_is_bounded_and_never_slower_than_heuristic():
    cfgs = space(10)
    current = {}

    def bench(f):
        f()
        return 1.0 if current["c"] == cfgs[4] else 2.0  # the heuristic is the fastest

    res = autotune.search(
        cfgs, cfgs[4], lambda c: current.__setitem__("c", c), strategy="quick", bench=bench
    )
    assert res.tried == autotune.QUICK_MAX_CANDIDATES and res.best == cfgs[4]
    assert set(res.timings) == {cfgs[4], *autotune.neighbours(cfgs[4], cfgs, 3)}
    # a tie keeps the heuristic too
    res = autotune.search(cfgs, cfgs[4], lambda c: None, strategy="exhaustive", bench=lambda f: 1.0)
    assert res.best == cfgs[4]


def test_search_large_space_sampling_respects_budget():
    cfgs = [
        Config.make(w, s, BM=bm, BN=bn)
        for w in (2, 4, 8)
        for s in (2, 3, 4)
        for bm in (16, 32, 64, 128)
        for bn in (16, 32, 64)
    ]
    assert len(cfgs) > autotune.EXHAUSTIVE_LIMIT
    clock = {"t": 0.0}

    def bench(f):
        f()
        clock["t"] += 1.0  # every timing costs one "second"
        return 1.0

    res = autotune.search(
        cfgs,
        cfgs[0],
        lambda c: None,
        strategy="exhaustive",
        budget_s=12,
        bench=bench,
        clock=lambda: clock["t"],
    )
    assert 10 <= res.tried <= 13  # the heuristic + what fits in 12 s
    # with no budget limit, sampling then local search ends on its own
    res = autotune.search(
        cfgs, cfgs[0], lambda c: None, strategy="exhaustive", budget_s=1e9, bench=lambda f: 1.0
    )
    assert autotune.EXHAUSTIVE_LIMIT // 4 <= res.tried < len(cfgs) + 1


def test_search_rejects_wrong_outputs_and_failures():
    cfgs = space(4)
    out = torch.zeros(8)

    def run(c):
        if c == cfgs[1]:
            out[:4] = 1.0  # leaves half unwritten (NaN-poisoned by the check)
        elif c == cfgs[2]:
            out.fill_(2.0)  # wrong values
        elif c == cfgs[3]:
            raise RuntimeError("does not compile")
        else:
            out.fill_(1.0)

    res = autotune.search(
        cfgs, cfgs[0], run, strategy="exhaustive", outputs=lambda: (out,), bench=lambda f: 0.5
    )
    assert res.best == cfgs[0] and res.tried == 1
    assert set(res.rejected) == set(cfgs[1:])
    assert "RuntimeError" in res.rejected[cfgs[3]] and "differs" in res.rejected[cfgs[2]]
    # without an outputs hook the return value of run is checked
    res = autotune.search(
        cfgs[:3],
        cfgs[0],
        lambda c: torch.full((3,), float(c["BLOCK"] == 32)),
        strategy="exhaustive",
        bench=lambda f: 0.5,
    )
    assert set(res.rejected) == {cfgs[1]}


class _Compiled:
    """Stands for what a GPU launch returns: Triton's compiled kernel, with its spills."""

    def __init__(self, spills: int):
        self.n_spills = spills

    def __getitem__(self, grid):  # kernel[grid](...) returns the compiled kernel
        return lambda *a, **k: self


def test_search_rejects_spilling_candidates_untimed():
    """A candidate whose kernel spills more than SPILL_LIMIT registers is rejected before
    it is timed; one at the limit is timed; the heuristic is timed whatever it spills."""
    from tilebackend.codegen import _common

    cfgs = space(4)
    spills = {cfgs[0]: 40, cfgs[1]: autotune.SPILL_LIMIT + 1, cfgs[2]: autotune.SPILL_LIMIT}
    current = {}

    def run(c):
        current["c"] = c
        _common.launch(_Compiled(spills.get(c, 0)), (1,))

    timed = []

    def bench(f):
        f()
        timed.append(current["c"])
        return {cfgs[0]: 3.0, cfgs[1]: 0.5, cfgs[2]: 2.0, cfgs[3]: 2.5}[current["c"]]

    res = autotune.search(cfgs, cfgs[0], run, strategy="exhaustive", bench=bench)
    assert set(timed) == {cfgs[0], cfgs[2], cfgs[3]}
    assert set(res.rejected) == {cfgs[1]} and "spills 17 registers" in res.rejected[cfgs[1]]
    assert res.best == cfgs[2] and res.heuristic_ms == 3.0
    # outside a search, launches are not collected
    assert not _common._watches


def test_search_compiles_candidates_in_threads_before_timing(monkeypatch):
    """With compile_workers, every candidate of a quick search is compiled (Triton's
    warmup: nothing runs) by worker threads before the first timed launch; a candidate
    that fails to compile there is still measured, and rejected, as before."""
    import threading

    from tilebackend.codegen import _common

    monkeypatch.setattr(autotune, "interpret_mode", lambda: False)
    cfgs = space(8)
    events = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            if kwargs["cfg"] == cfgs[2]:
                raise RuntimeError("does not compile")
            events.append(("compile", kwargs["cfg"], threading.get_ident()))
            return self

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["cfg"] == cfgs[2]:
                    raise RuntimeError("does not compile")
                events.append(("run", kwargs["cfg"], threading.get_ident()))

            return launch

    kernel = Kernel()
    res = autotune.search(
        cfgs,
        cfgs[1],
        lambda c: _common.launch(kernel, (1,), cfg=c),
        strategy="quick",
        bench=lambda f: (f(), 1.0)[1],
        compile_workers=4,
    )
    candidates = {cfgs[1], *autotune.neighbours(cfgs[1], [c for c in cfgs if c != cfgs[1]], 3)}
    assert cfgs[2] in candidates and set(res.rejected) == {cfgs[2]}
    compiled = [e for e in events if e[0] == "compile"]
    first_run = next(i for i, e in enumerate(events) if e[0] == "run")
    assert {e[1] for e in compiled} == candidates - {cfgs[2]} == set(res.timings)
    assert all(e[0] == "compile" for e in events[:first_run])
    assert len(compiled) == first_run  # each compiled once, all before any run
    assert threading.get_ident() not in {e[2] for e in compiled}
    assert all(e[2] == threading.get_ident() for e in events if e[0] == "run")
    # without workers (and in the interpreter), nothing is compiled apart
    events.clear()
    autotune.search(
        cfgs, cfgs[1], lambda c: _common.launch(kernel, (1,), cfg=c), bench=lambda f: 1.0
    )
    assert not [e for e in events if e[0] == "compile"]


def test_search_rotates_input_copies():
    seen = []
    runs = [lambda c, i=i: seen.append(i) for i in range(3)]
    autotune.search(
        [],
        Config.make(BLOCK=16),
        runs[0],
        rotate=runs[1:],
        bench=lambda f: [f() for _ in range(6)] and 1.0,
    )
    assert seen[1:] == [0, 1, 2, 0, 1, 2]  # first call is the correctness run


# --- select: modes --------------------------------------------------------------------------


def _boom(*a, **k):
    raise AssertionError("do_bench must not be called")


def test_off_and_interpreter_use_heuristic_without_timing(monkeypatch):
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", _boom)
    cfgs, calls = space(3), []
    for s, source in (
        (settings.Settings(autotune="off"), "off"),
        (settings.Settings(), "interpreter"),
    ):
        with settings.use(s):
            assert autotune.select("kern", (source,), cfgs, cfgs[1], calls.append) == cfgs[1]
            assert autotune.decisions[("kern", source)].source == source
            assert not autotune.decisions[("kern", source)].timed
    assert "nothing is timed" in autotune.decisions[("kern", "interpreter")].reason
    assert calls == []
    # a real kernel too
    a, b = torch.randn(8, 16), torch.randn(16, 8)
    torch.testing.assert_close(matmul.matmul(a, b), a @ b, atol=1e-4, rtol=1e-4)
    assert any(
        k[0] == "matmul" and d.source == "interpreter" for k, d in autotune.decisions.items()
    )


def _fake_gpu(monkeypatch, ms_of):
    """Run select's GPU path on CPU: interpret_mode off in autotune, do_bench faked."""
    import triton.testing

    calls = []
    current = {}

    def do_bench(fn, warmup=25, rep=100, return_mode="mean", **kw):
        fn()
        calls.append(current["c"])
        return ms_of(current["c"])

    monkeypatch.setattr(autotune, "interpret_mode", lambda: False)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return calls, lambda c: current.__setitem__("c", c)


def test_gpu_path_fills_and_consults_the_cache(monkeypatch):
    cfgs = space(5)
    calls, run = _fake_gpu(monkeypatch, lambda c: 1.0 / c["BLOCK"])  # bigger is faster
    with settings.use(settings.Settings(search="exhaustive")):
        got = autotune.select("kern", (torch.float16, 64), cfgs, cfgs[0], run)
    assert got == cfgs[-1] and len(calls) == 5
    d = autotune.decisions[("kern", torch.float16, 64)]
    assert d.source == "tuned" and d.timed and d.ms < d.heuristic_ms
    files = list(tuning_cache.default_cache_dir().rglob("kern-*.json"))
    assert len(files) == 1
    # a new process (forgotten choices, fresh cache object): from disk, nothing timed
    autotune.reset()
    tuning_cache._caches.clear()
    calls.clear()
    with settings.use(settings.Settings(search="exhaustive")):
        assert autotune.select("kern", (torch.float16, 64), cfgs, cfgs[0], run) == cfgs[-1]
    assert calls == [] and autotune.decisions[("kern", torch.float16, 64)].source == "cache"
    # a quick result does not satisfy an exhaustive search; a quick search accepts it
    autotune.reset()
    with settings.use(settings.Settings(search="quick")):
        autotune.select("kern", (torch.float32, 64), cfgs, cfgs[0], run)
    assert len(calls) == autotune.QUICK_MAX_CANDIDATES
    autotune.reset()
    calls.clear()
    with settings.use(settings.Settings(search="exhaustive")):
        autotune.select("kern", (torch.float32, 64), cfgs, cfgs[0], run)
    assert len(calls) == 5


def test_gpu_path_compiles_candidates_on_the_set_threads(monkeypatch):
    """select's search compiles its candidates first on compile_threads threads (default
    min(8, CPUs)); compile_threads=1 compiles nothing apart."""
    cfgs = space(5)
    calls, run = _fake_gpu(monkeypatch, lambda c: 1.0)
    seen = []
    real = autotune.precompile
    monkeypatch.setattr(
        autotune, "precompile", lambda r, c, w: (seen.append((list(c), w)), real(r, c, w))
    )
    for threads, key in ((3, 1), (None, 2), (1, 3)):
        seen.clear()
        with settings.use(settings.Settings(compile_threads=threads)):
            autotune.select("kern", (torch.float16, key), cfgs, cfgs[0], run)
        if threads == 1:
            assert seen == []
        else:
            assert seen and seen[0][1] == (threads or autotune.COMPILE_WORKERS)
            assert len(seen[0][0]) == autotune.QUICK_MAX_CANDIDATES and seen[0][0][0] == cfgs[0]


def test_coordinate_decision_logic():
    class FakeDist:
        def __init__(self, rank, value=None):
            self.rank, self.value = rank, value

        def get_rank(self):
            return self.rank

        def broadcast_object_list(self, obj, src):
            assert src == 0
            if self.rank != 0:
                obj[0] = self.value

    assert autotune.coordinate(lambda: "mine", FakeDist(0)) == "mine"
    assert autotune.coordinate(_boom, FakeDist(1, value="from0")) == "from0"  # rank 1 never decides

    def fails():
        raise RuntimeError("x")

    assert autotune.coordinate(fails, FakeDist(0)) is None
    assert autotune.coordinate(lambda: 3) == 3  # no process group


def _dist_worker(rank: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    try:
        decided = []
        got = autotune.coordinate(lambda: decided.append(rank) or ("cfg", rank))
        assert got == ("cfg", 0) and decided == ([0] if rank == 0 else [])
    finally:
        dist.destroy_process_group()


def test_coordinate_gloo_two_ranks(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_dist_worker, args=(r, str(tmp_path / "store"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]


# --- settings -------------------------------------------------------------------------------


def test_settings_fields_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TILEBACKEND_TUNE_BUDGET_S", "7.5")
    monkeypatch.setenv("TILEBACKEND_SEARCH", "exhaustive")
    s = settings.Settings.from_env()
    assert s.tune_budget_s == 7.5 and s.search == "exhaustive" and s.tuning is None
    monkeypatch.setenv("TILEBACKEND_TUNE_BUDGET_S", "soon")
    with pytest.raises(InvalidOptionValueError, match="TILEBACKEND_TUNE_BUDGET_S"):
        settings.Settings.from_env()
    monkeypatch.delenv("TILEBACKEND_TUNE_BUDGET_S")
    monkeypatch.delenv("TILEBACKEND_SEARCH")
    monkeypatch.setenv("TILEBACKEND_COMPILE_THREADS", "3")
    assert settings.Settings.from_env().compile_threads == 3
    monkeypatch.setenv("TILEBACKEND_COMPILE_THREADS", "many")
    with pytest.raises(InvalidOptionValueError, match="TILEBACKEND_COMPILE_THREADS"):
        settings.Settings.from_env()
    monkeypatch.delenv("TILEBACKEND_COMPILE_THREADS")
    assert settings.Settings.from_env().compile_threads is None
    for bad in (0, True, 2.5, "4"):
        with pytest.raises(InvalidOptionValueError, match="compile_threads"):
            settings.Settings().with_options({"compile_threads": bad})
    with pytest.raises(InvalidOptionValueError, match="tune_budget_s"):
        settings.Settings().with_options({"tune_budget_s": 0})
    with pytest.raises(InvalidOptionValueError, match="search"):
        settings.Settings().with_options({"search": "everything"})
    with pytest.raises(TuningArtifactError, match="cannot be read"):
        settings.Settings().with_options({"tuning": tmp_path / "missing.json"})
    assert tilebackend.TileBackend().settings.search == "quick"
    assert tilebackend.TileBackend(mode="max-autotune").settings.search == "exhaustive"
    assert (
        tilebackend.TileBackend(mode="max-autotune-no-cudagraphs").settings.search == "exhaustive"
    )
    assert (
        tilebackend.TileBackend(mode="max-autotune", options={"search": "quick"}).settings.search
        == "quick"
    )


# --- artifacts ------------------------------------------------------------------------------


def _artifact(tmp_path, env=None, run=None, cfg=None):
    run = run or (lambda c: None)
    k = autotune._cache_key("kern", ("a", 1), None, run)
    e = {"kernel": "kern", "key": k.key, "source": k.source, **entry()}
    if cfg is not None:
        e["config"] = cfg.to_dict()
    path = tmp_path / "art.json"
    tuning_cache.save_artifact(path, env or k.env, [e])
    return path, run


def test_artifact_round_trip_and_use(tmp_path, monkeypatch):
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", _boom)
    cfgs = space(3)
    path, run = _artifact(tmp_path, cfg=cfgs[2])
    art = tuning_cache.load_artifact(path)
    assert art.env["device"] == "interpreter" and len(art.entries) == 1
    data = json.loads(path.read_text())
    assert data["format"] == tuning_cache.ARTIFACT_FORMAT and data["version"] == 1
    assert {"torch", "triton", "device", "sha256", "entries"} <= data.keys()
    with settings.use(settings.Settings().with_options({"tuning": str(path)})):
        assert autotune.select("kern", ("a", 1), cfgs, cfgs[0], run) == cfgs[2]
        assert autotune.select("kern", ("a", 2), cfgs, cfgs[0], run) == cfgs[0]  # not in it
    assert autotune.decisions[("kern", "a", 1)].source == "artifact"
    # a config that is no longer in the space is not used, and a warning says so
    autotune.reset()
    path, run = _artifact(tmp_path, run=run, cfg=Config.make(BLOCK=999))
    with settings.use(settings.Settings().with_options({"tuning": str(path)})):
        with pytest.warns(RuntimeWarning, match="'kern' config .* is not one of"):
            assert autotune.select("kern", ("a", 1), cfgs, cfgs[0], run) == cfgs[0]


def test_artifact_of_another_kernel_source_warns_once_and_is_unused(tmp_path):
    """Entries tuned for another version of a kernel's source (the kernel changed after
    the artifact was made) are not used, and one warning says why (they were ignored
    without a word); a key the artifact simply lacks is tuned quietly."""
    cfgs = space(3)
    path, run = _artifact(tmp_path, cfg=cfgs[2])
    data = json.loads(path.read_text())
    for e in data["entries"]:
        e["source"] = "0123456789abcdef"
    tuning_cache.save_artifact(
        path, {k: data[k] for k in ("device", "torch", "triton")}, data["entries"]
    )
    with settings.use(settings.Settings().with_options({"tuning": str(path)})):
        with pytest.warns(RuntimeWarning, match="another version of that kernel's source"):
            assert autotune.select("kern", ("a", 1), cfgs, cfgs[0], run) == cfgs[0]
        autotune._chosen.clear()
        autotune._not_in_artifact.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once; and no entry at all: no warning
            autotune.select("kern", ("a", 1), cfgs, cfgs[0], run)
            autotune.select("kern", ("b", 2), cfgs, cfgs[0], run)


def test_artifact_corrupt_is_an_error(tmp_path):
    path, _ = _artifact(tmp_path)
    good = path.read_text()
    cases = {
        "sha256 does not match": good.replace('"BLOCK_M": 64', '"BLOCK_M": 32'),
        "not valid JSON": good[: len(good) // 2],
        "not a tilebackend tuning artifact": "[1, 2]",
        "format version 2": good.replace('"version": 1', '"version": 2'),
    }
    for i, (msg, text) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.json"
        p.write_text(text)
        with pytest.raises(TuningArtifactError, match=msg):
            tuning_cache.load_artifact(p)
        with pytest.raises(TuningArtifactError):
            settings.Settings().with_options({"tuning": str(p)})


def test_artifact_other_device_or_versions_warns_and_is_unused(tmp_path):
    cfgs = space(3)
    for i, other in enumerate(({"device": "NVIDIA H100 80GB HBM3 sm90"}, {"torch": "2.11.0"})):
        autotune.reset()
        run = lambda c: None  # noqa: E731
        k = autotune._cache_key("kern", ("a", 1), None, run)
        path, _ = _artifact(tmp_path / str(i), env={**k.env, **other}, run=run, cfg=cfgs[2])
        with settings.use(settings.Settings().with_options({"tuning": str(path)})):
            with pytest.warns(RuntimeWarning, match="made for another setup"):
                assert autotune.select("kern", ("a", 1), cfgs, cfgs[0], run) == cfgs[0]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # only once
                autotune.select("kern", ("a", 3), cfgs, cfgs[0], run)


# --- tune() ----------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        return torch.softmax(self.norm(self.fc(x)), dim=-1)


def test_tune_writes_an_artifact(tmp_path, monkeypatch, capsys):
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", _boom)
    out = tmp_path / "tiny.json"
    data = tilebackend.tune(_Tiny(), torch.randn(4, 16), budget_s=5, out=out)
    assert "tune" in tilebackend.__all__
    art = tuning_cache.load_artifact(out)
    kernels = {k[0] for k in art.entries}
    assert {"softmax_fwd", "layer_norm_fwd", "matmul"} <= kernels
    assert data["device"] == "interpreter" and all(not e["timed"] for e in data["entries"])
    err = capsys.readouterr().err
    assert "kernel site(s)" in err and "interpreter mode: nothing is timed" in err
    # the artifact loads as an option
    tilebackend.TileBackend(options={"tuning": str(out)})


def test_tune_backward_leaves_no_gradients_and_no_warning(tmp_path, monkeypatch):
    """``backward=True`` tunes the backward kernels too, and leaves the ``.grad`` of the
    parameters and inputs as they were (a following accumulation step stays right);
    nothing warns about CUDA graphs the user never asked for."""
    import warnings

    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", _boom)
    model, x = _Tiny(), torch.randn(4, 16, requires_grad=True)
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        data = tilebackend.tune(model, x, budget_s=5, out=tmp_path / "t.json", backward=True)
    assert {"layer_norm_bwd", "softmax_bwd"} & {e["kernel"] for e in data["entries"]}, data
    assert torch.equal(first.grad, torch.ones_like(first)) and x.grad is None
    assert all(p.grad is None for p in list(model.parameters())[1:])


def test_tune_leaves_buffers_and_random_state_as_they_were(tmp_path, monkeypatch):
    """A tuning run is not a training step: BatchNorm's running statistics and the
    random generators are as before (tune() used to advance both)."""
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", _boom)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 24), torch.nn.BatchNorm1d(24), torch.nn.Dropout(0.3),
        torch.nn.LayerNorm(24),
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 16)
    torch.manual_seed(7)
    expect = torch.rand(3)
    torch.manual_seed(7)
    data = tilebackend.tune(model, x, out=tmp_path / "t.json", backward=True)
    assert "layer_norm_fwd" in {e["kernel"] for e in data["entries"]}, data
    assert torch.equal(torch.rand(3), expect)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_has_tune(capsys):
    from tilebackend.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["tune", "--help"])
    assert e.value.code == 0 and "--budget-s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--search-budget-s", "-1"], "--search-budget-s: '-1' is not above zero"),
        (["--seq", "0"], "--seq: '0' is not above zero"),
        (["--out", "/no/such/folder/t.json"], "--out /no/such/folder/t.json: folder"),
        (["--device", "cuda"], "--device cuda: no CUDA device"),
    ],
)
def test_cli_usage_errors_come_before_any_work(capsys, args, msg):
    """Bad CLI arguments are usage errors (exit 2, the flag named) found up front: a run
    with an unwritable --out used to tune everything, then end in a traceback naming a
    hidden temp file."""
    from tilebackend.__main__ import main

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        main(["tune", *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


# --- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tuned_config_never_slower_than_heuristic():
    import triton.testing

    a = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    b = torch.randn(1024, 768, device="cuda", dtype=torch.float16)
    tuned = settings.Settings(search="exhaustive", tune_budget_s=20)
    with settings.use(tuned):
        out = matmul.matmul(a, b)
    torch.testing.assert_close(out, a @ b, atol=1e-1, rtol=1e-2)
    d = next(d for k, d in autotune.decisions.items() if k[0] == "matmul")
    assert d.source == "tuned" and d.timed and d.ms is not None and d.heuristic_ms is not None
    assert d.ms <= d.heuristic_ms
    # re-time end to end: the chosen config (memoised) against the heuristic config
    with settings.use(tuned):
        t_tuned = triton.testing.do_bench(lambda: matmul.matmul(a, b), return_mode="median")
    with settings.use(settings.Settings(autotune="off")):
        t_heur = triton.testing.do_bench(lambda: matmul.matmul(a, b), return_mode="median")
    assert t_tuned <= t_heur * 1.10, (d.config, t_tuned, t_heur)


@pytest.mark.gpu
def test_quick_search_on_the_gpu_precompiles_and_reads_spills(tmp_path, monkeypatch):
    """A real quick search of a GEMM epilogue with a residual and a mask: its candidates
    are compiled on threads first (each timed launch then finds its kernel compiled), the
    kernels' spills are read, and every config timed or rejected says why."""
    import time

    from tilebackend.codegen import fused_matmul  # noqa: F401  (tile::mm_epilogue)
    from tilebackend.codegen import pointwise as pw

    monkeypatch.setenv("TILEBACKEND_CACHE_DIR", str(tmp_path))
    tuning_cache._caches.clear()
    autotune.reset()
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4096, 3072, device="cuda") > 0.1
    expr = ("where", "IN1", ("add", ("gelu", "ACC", "tanh"), "IN0"), 0.0)
    seen = []
    real = autotune.precompile
    monkeypatch.setattr(
        autotune, "precompile", lambda r, c, n: (seen.append(len(c)), real(r, c, n))[1]
    )
    t0 = time.perf_counter()
    with settings.use(settings.Settings(search="quick")):
        out = torch.ops.tile.mm_epilogue(x, w.t(), bias, [res, mask], pw.dumps(expr))
    elapsed = time.perf_counter() - t0
    ref = torch.where(mask, torch.nn.functional.gelu(x @ w.t() + bias, approximate="tanh") + res, 0)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
    d = next(d for k, d in autotune.decisions.items() if k[0] == "mm_epilogue")
    assert seen == [autotune.QUICK_MAX_CANDIDATES] and d.source == "tuned"
    assert d.tried + len(d.rejected) == autotune.QUICK_MAX_CANDIDATES, (d.tried, d.rejected)
    print(f"quick search {elapsed:.1f} s: {d.config}; rejected {d.rejected}")


@pytest.mark.parametrize("aten_faster", [True, False])
def test_plain_gemm_times_cublas_as_a_baseline(monkeypatch, aten_faster):
    """On a GPU the plain GEMM's tuning also times ATen's GEMM (first, whatever the
    search), and uses it only when it measured faster; its calls are then replayed
    from launch plans like a kernel's.  (The GPU path simulated: timings faked.)"""
    import triton.testing

    from tilebackend.codegen import _common, plans
    from tilebackend.codegen import matmul as mm

    timed: list[bool] = []  # per timing: did ATen's GEMM run?

    def do_bench(fn, **kw):
        before = _common.launch_counts["aten_gemm"]
        fn()
        ran_aten = _common.launch_counts["aten_gemm"] > before
        timed.append(ran_aten)
        return (0.5 if ran_aten else 1.0) if aten_faster else (2.0 if ran_aten else 1.0)

    monkeypatch.setattr(autotune, "interpret_mode", lambda: False)
    monkeypatch.setattr(mm, "interpret_mode", lambda: False)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    a, b, bias = torch.randn(8, 16), torch.randn(16, 24), torch.randn(24)
    with settings.use(settings.Settings(poison_outputs=True)):
        for i in range(4):  # plain, recorded, replayed x2
            a = a + i
            with _common.count_launches() as n:
                out = torch.ops.tile.addmm(bias, a, b)
            torch.testing.assert_close(out, torch.addmm(bias, a, b), atol=1e-4, rtol=1e-4)
            if i:
                want = {"addmm": 1, "aten_gemm": 1} if aten_faster else {"addmm": 1}
                assert dict(n) == want, (i, dict(n))
    (d,) = [d for k, d in autotune.decisions.items() if k[0] == "matmul"]
    assert (d.config == mm.ATEN_CONFIG) == aten_faster, d
    assert d.source == "tuned" and timed.count(True) == 1 and timed[1] is True, timed
    assert plans.stats[("tile::addmm", "replayed")] >= 2


def _epilogue_cases():
    from tilebackend.codegen import (  # noqa: F401  (registers the tile:: ops)
        dual_matmul,
        fused_matmul,
        fused_matmul_multi,
        fused_matmul_sum,
    )
    from tilebackend.codegen import pointwise as pw

    torch.manual_seed(0)
    x, w, w1 = torch.randn(9, 16), torch.randn(24, 16), torch.randn(24, 16)
    bias, res = torch.randn(24), torch.randn(9, 24)
    gelu = ("add", ("gelu", "ACC", "tanh"), "IN0")
    tile = torch.ops.tile
    ta, tb = torch.randn(9, 7), torch.randn(7, 24)
    return {
        "mm_epilogue": (
            lambda: tile.mm_epilogue(x, w.t(), bias, [res], pw.dumps(gelu)),
            lambda: torch.nn.functional.gelu(x @ w.t() + bias, approximate="tanh") + res,
        ),
        "mm_epilogue_multi": (
            lambda: tile.mm_epilogue_multi(
                x, w.t(), bias, [res], [pw.dumps(gelu), pw.dumps(("gt", "ACC", 0.0))]
            ),
            lambda: [
                torch.nn.functional.gelu(x @ w.t() + bias, approximate="tanh") + res,
                x @ w.t() + bias > 0,
            ],
        ),
        "dual_mm_epilogue": (
            lambda: tile.dual_mm_epilogue(
                x, w.t(), w1.t(), None, bias, [], pw.dumps(("mul", ("silu", "ACC"), "ACC1"))
            ),
            lambda: torch.nn.functional.silu(x @ w.t()) * (x @ w1.t() + bias),
        ),
        "mm_sum_epilogue": (
            lambda: tile.mm_sum_epilogue(
                x, w.t(), None, [ta], [tb], [res], pw.dumps(("add", "ACC", "IN0"))
            ),
            lambda: x @ w.t() + ta @ tb + res,
        ),
    }


@pytest.mark.parametrize("kernel", list(_epilogue_cases()))
@pytest.mark.parametrize("unfused_faster", [True, False])
def test_fused_gemm_times_the_unfused_ops_as_a_baseline(monkeypatch, kernel, unfused_faster):
    """On a GPU a fused GEMM's tuning also times ATen's GEMM followed by its epilogue in
    eager ops, and runs that only when it measured faster: a fused kernel is never
    slower than what it replaced.  (The GPU path simulated: timings faked.)"""
    import triton.testing

    from tilebackend.codegen import _common, epilogue_host

    def do_bench(fn, **kw):
        before = _common.launch_counts["aten_gemm"]
        fn()
        ran_aten = _common.launch_counts["aten_gemm"] > before
        return (0.5 if ran_aten else 1.0) if unfused_faster else (2.0 if ran_aten else 1.0)

    monkeypatch.setattr(autotune, "interpret_mode", lambda: False)
    monkeypatch.setattr(epilogue_host, "interpret_mode", lambda: False)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    call, ref = _epilogue_cases()[kernel]
    with settings.use(settings.Settings(poison_outputs=True)):
        for _ in range(3):
            with _common.count_launches() as n:
                out = call()
            torch.testing.assert_close(out, ref(), atol=1e-4, rtol=1e-4)
    (d,) = [d for k, d in autotune.decisions.items() if k[0] == kernel]
    assert (d.config == matmul.ATEN_CONFIG) == unfused_faster, d
    assert (n["aten_gemm"] > 0) == unfused_faster and n[kernel] == 1, dict(n)


def test_no_unfused_baseline_for_an_epilogue_that_draws(monkeypatch):
    """A dropout drawn in the epilogue has no eager twin (the kernel's random stream is its
    own): the fused kernel is the only candidate."""
    import triton.testing

    from tilebackend.codegen import _common, epilogue_host, fused_matmul  # noqa: F401
    from tilebackend.codegen import pointwise as pw

    seen: list[list] = []
    real = autotune.select

    def select(kernel, key, configs, *a, **k):
        seen.append(list(configs))
        return real(kernel, key, configs, *a, **k)

    monkeypatch.setattr(autotune, "interpret_mode", lambda: False)
    monkeypatch.setattr(epilogue_host, "interpret_mode", lambda: False)
    monkeypatch.setattr(autotune, "select", select)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    x, w, seed = torch.randn(9, 16), torch.randn(16, 24), torch.tensor([7])
    expr = ("where", ("gt", ("rand", "IN0"), 0.5), ("mul", "ACC", 2.0), 0.0)
    with _common.count_launches() as n:
        torch.ops.tile.mm_epilogue(x, w, None, [seed], pw.dumps(expr))
    assert seen and matmul.ATEN_CONFIG not in seen[0] and not n["aten_gemm"], dict(n)
    assert n["mm_epilogue"] >= 1, dict(n)
