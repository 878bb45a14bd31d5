"""Traced patterns cached on disk (``fx_passes/pattern_cache.py``): a new process reads
them instead of tracing, and must match exactly what tracing gives; a bad file is traced
over, never trusted."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import tilebackend
from tilebackend.codegen import _common
from tilebackend.fx_passes import matcher, pattern_cache
from tilebackend.fx_passes.registry import REGISTRY
from tilebackend.models import TinyTransformer


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private cache folder, and no traced pattern remembered in this process."""
    monkeypatch.setenv("TILEBACKEND_CACHE_DIR", str(tmp_path))
    matcher._variants_cached.cache_clear()
    yield tmp_path / "patterns"
    matcher._variants_cached.cache_clear()


def _traced_patterns():
    REGISTRY.ensure_builtins()
    return [p for p in REGISTRY._patterns.values() if not p.is_op_pattern]


def _rms_model_counts():
    torch._dynamo.reset()
    model = TinyTransformer(dim=32, layers=1, norm="rms")
    tokens = torch.randint(0, 97, (2, 7))
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    with torch.no_grad(), _common.count_launches() as n:
        out = torch.compile(model, backend=backend)(tokens)
        torch.testing.assert_close(out, model(tokens), atol=1e-4, rtol=1e-4)
    return backend.report.counts, dict(n)


def _ranks(tp) -> list:
    """Each node's value rank: what the matcher reads of a pattern node's value."""
    return [
        n.meta["val"].dim() if isinstance(n.meta.get("val"), torch.Tensor) else None
        for n in tp.graph.nodes
    ]


def test_round_trip_rebuilds_every_builtin_variant(fresh, monkeypatch):
    traced = {
        p.name: [(tp.signature(), _ranks(tp)) for tp in matcher.variants(p, "eager")]
        for p in _traced_patterns()
    }
    files = sorted(fresh.glob("*.json"))
    assert files and all(json.loads(f.read_text())["format"] == pattern_cache.FORMAT for f in files)
    matcher._variants_cached.cache_clear()
    monkeypatch.setattr(matcher, "trace_pattern", lambda *a: pytest.fail("traced again"))
    for p in _traced_patterns():
        got = [(tp.signature(), _ranks(tp)) for tp in matcher.variants(p, "eager")]
        assert got == traced[p.name]


def test_a_model_matches_the_same_from_the_cache(fresh, poison):
    first = _rms_model_counts()  # traces, writes the files
    assert any(fresh.glob("*.json"))
    matcher._variants_cached.cache_clear()
    assert _rms_model_counts() == first  # reads them: same rewrites, same launches
    assert first[0].get("rms_norm_llama") == 3, first


def test_a_corrupt_or_stale_file_is_traced_over(fresh, caplog):
    (p,) = [p for p in _traced_patterns() if p.name == "rms_norm_llama"]
    want = [tp.signature() for tp in matcher.variants(p, "eager")]
    files = sorted(fresh.glob("*.json"))
    files[0].write_text("{not json")
    data = json.loads(files[1].read_text())
    data["signature"] = "graph(): something else"
    files[1].write_text(json.dumps(data))
    matcher._variants_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="tilebackend"):
        got = [tp.signature() for tp in matcher.variants(p, "eager")]
    assert got == want
    assert "JSONDecodeError" in caplog.text and "differs from the traced one" in caplog.text
    json.loads(files[0].read_text())  # rewritten by the fresh trace


def test_the_key_follows_what_the_trace_depends_on(fresh, monkeypatch):
    (p,) = [p for p in _traced_patterns() if p.name == "rms_norm_llama"]
    k = pattern_cache.key(p, torch.float32, "eager", {})
    assert k != pattern_cache.key(p, torch.float16, "eager", {})
    assert k != pattern_cache.key(p, torch.float32, "inductor", {torch.ops.aten.mm.default: None})
    from tilebackend.codegen import tuning_cache

    monkeypatch.setattr(tuning_cache, "_file_hash", lambda f: "edited")
    assert k != pattern_cache.key(p, torch.float32, "eager", {})


def test_off_switch(fresh, monkeypatch):
    monkeypatch.setenv("TILEBACKEND_PATTERN_CACHE", "0")
    for p in _traced_patterns():
        matcher.variants(p, "eager")
    assert not fresh.exists() or not any(fresh.iterdir())


def test_user_patterns_are_not_cached(fresh):
    """A user's search function may call code the key cannot see: traced each process."""

    class UserPattern:
        name = "mine"
        scalars: dict = {}

        @staticmethod
        def search(x):
            return x * 2

        @staticmethod
        def example_inputs(dtype):
            return [torch.randn(2, 3, dtype=dtype)]

    assert pattern_cache.key(UserPattern, torch.float32, "eager", {}) is None
