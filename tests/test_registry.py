"""The pattern registry and matcher: tracing, wildcards, legality, clear errors."""

from __future__ import annotations

import pytest
import torch

import tilebackend
from tilebackend.exc import DuplicatePatternError, InvalidOptionValueError, PatternError
from tilebackend.fx_passes import matcher
from tilebackend.fx_passes.registry import REGISTRY, Pattern, Registry

aten = torch.ops.aten


def _ex(dtype):
    return (torch.randn(4, 8, dtype=dtype),)


def test_builtins_registered_lazily_and_listed():
    names = REGISTRY.names()
    for n in ["softmax", "layer_norm", "mm", "addmm", "bmm", "rms_norm_llama"]:
        assert n in names


def test_duplicate_name_names_both_places():
    reg = Registry()
    p = dict(search=aten.relu.default, replacement=aten.relu.default)
    reg.add(Pattern(name="x", origin="a.py:1", **p))
    with pytest.raises(DuplicatePatternError, match=r"'x'.*a\.py:1.*b\.py:2"):
        reg.add(Pattern(name="x", origin="b.py:2", **p))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(search=lambda x: x.relu(), replacement=lambda x: x), "example_inputs"),
        (dict(search=aten.relu.default, replacement=lambda x: x), "OpOverload replacement"),
        (
            dict(
                search=lambda x: x,
                replacement=lambda x: x,
                example_inputs=_ex,
                scalars={"k": (1, 2)},
            ),
            "scalar 'k' is not a parameter",
        ),
        (
            dict(
                search=lambda x, k: x * k,
                replacement=lambda x, k: x,
                example_inputs=_ex,
                scalars={"k": (1.0, 1.0)},
            ),
            "two distinct",
        ),
        (dict(search=3, replacement=lambda x: x, example_inputs=_ex), "search must be"),
    ],
)
def test_malformed_patterns_are_rejected(kwargs, msg):
    with pytest.raises(PatternError, match=msg):
        Registry().add(Pattern(name="bad", **kwargs))


def test_search_that_does_not_trace_is_a_clear_error():
    def search(x):
        raise ValueError("nope")

    p = Pattern(name="broken", search=search, replacement=lambda x: x, example_inputs=_ex)
    with pytest.raises(PatternError, match="does not trace"):
        matcher.trace_pattern(p, torch.float32, {})


def test_scalar_wildcards_and_rank_independent_dims():
    p = Pattern(
        name="scaled_softmax",
        search=lambda x, scale, dim: torch.softmax(x * scale, dim),
        replacement=lambda x, scale, dim: torch.ops.aten._softmax(x * scale, dim, False),
        example_inputs=_ex,
        scalars={"scale": (0.5, 0.25), "dim": (-1, 0)},
        dtypes=(torch.float32,),
    )
    (tp,) = matcher.variants(p, "eager")

    def graph_of(fn, *args):
        return matcher._trace(fn, args, {})

    gm = graph_of(lambda x: torch.softmax(x * 0.125, 2), torch.randn(2, 3, 5))
    anchor = next(n for n in gm.graph.nodes if n.target == aten._softmax.default)
    m = matcher.match_traced(tp, p, anchor)
    assert isinstance(m, matcher.Match), m
    assert m.scalars == {"scale": 0.125, "dim": -1}  # dims come back rank-relative


def test_intermediate_with_other_users_is_not_matched():
    p = Pattern(
        name="scaled_softmax",
        search=lambda x: torch.softmax(x * 2.0, -1),
        replacement=lambda x: x,
        example_inputs=_ex,
        dtypes=(torch.float32,),
    )
    (tp,) = matcher.variants(p, "eager")

    def model(x):
        y = x * 2.0
        return torch.softmax(y, -1), y

    gm = matcher._trace(model, (torch.randn(3, 4),), {})
    anchor = next(n for n in gm.graph.nodes if n.target == aten._softmax.default)
    res = matcher.match_traced(tp, p, anchor)
    assert isinstance(res, str) and "also used" in res


def test_user_traced_pattern_rewrites_and_can_be_disabled():
    # silu written out -> aten.silu: replacement is plain torch ops
    p = Pattern(
        name="test_silu",
        search=lambda x: x * torch.sigmoid(x),
        replacement=lambda x: torch.ops.aten.silu.default(x),
        example_inputs=_ex,
        origin="test",
    )
    REGISTRY.add(p)
    try:
        fn = lambda x: (x * torch.sigmoid(x)) + 1  # noqa: E731
        x = torch.randn(5, 3)
        for opts, expected in [({}, {"test_silu": 1}), ({"disable": ["test_silu"]}, {})]:
            torch._dynamo.reset()
            be = tilebackend.TileBackend(options={"fallback": "eager", **opts})
            out = torch.compile(fn, backend=be)(x)
            torch.testing.assert_close(out, fn(x))
            assert be.report.counts == expected
    finally:
        REGISTRY.remove("test_silu")


def test_unknown_pattern_name_in_options():
    torch._dynamo.reset()
    be = tilebackend.TileBackend(options={"fallback": "eager", "disable": ["no_such"]})
    with pytest.raises(Exception, match="no_such"):
        torch.compile(lambda x: x + 1, backend=be)(torch.randn(2))
    assert issubclass(InvalidOptionValueError, tilebackend.TileError)


@pytest.mark.parametrize(
    "returned, reason",
    [
        (None, None),
        (True, None),
        (1, None),
        (False, "check returned False"),
        (0, "check returned 0"),
        ("too narrow", "too narrow"),
        ("", "check returned an empty reason"),
    ],
)
def test_check_results(returned, reason):
    """What a check's result means: None or anything truthy accepts, anything falsy or a
    reason string refuses (a 1 used to refuse, with the reason "1")."""
    p = Pattern(name="p", search=torch.sigmoid, replacement=torch.sigmoid, check=lambda x: returned)
    assert p.run_check({"x": torch.ones(2)}) == reason


def _failing(stage: str) -> Pattern:
    """silu written out, with a search that cannot be traced or a replacement that raises."""

    def search(x):
        if stage == "trace":
            raise ValueError("cannot trace this")
        return x * torch.sigmoid(x)

    def replacement(x):
        torch.ops.aten.relu.default(x)  # a node is spliced in before it fails
        raise RuntimeError("boom")

    return Pattern(
        name=f"test_fails_{stage}",
        search=search,
        replacement=replacement,
        example_inputs=_ex,
        origin="test",
    )


@pytest.mark.parametrize("stage", ["trace", "replace"])
def test_a_failing_pattern_costs_only_its_own_matches(stage):
    """A user pattern that fails while the graph is rewritten (its search does not trace,
    or its replacement raises) is dropped with one warning and a note naming it; the
    graph's other rewrites (here the built-in softmax) still happen, and the numbers are
    eager's.  (It used to cost the whole graph all of its rewrites.)"""
    import warnings

    p = _failing(stage)
    REGISTRY.add(p)
    try:
        torch._dynamo.reset()

        def fn(x):
            return torch.softmax(x * torch.sigmoid(x), -1) + x * torch.sigmoid(x + 1)

        x = torch.randn(5, 7)
        be = tilebackend.TileBackend(options={"fallback": "eager", "fusion": False})
        with warnings.catch_warnings(record=True) as w, tilebackend.count_launches() as launches:
            warnings.simplefilter("always")
            out = torch.compile(fn, backend=be)(x)
        torch.testing.assert_close(out, fn(x))
        mine = [str(m.message) for m in w if p.name in str(m.message)]
        assert len(mine) == 1, mine
        assert ("cannot trace this" if stage == "trace" else "boom") in mine[0]
        assert be.report.counts == {"softmax": 1}
        assert launches == {"softmax_fwd": 1}, launches
        assert p.name in str(be.report)
        assert "relu" not in be.report.graphs[-1].code  # the failed splice left nothing
    finally:
        REGISTRY.remove(p.name)


def test_user_check_on_symbolic_sizes_guards_them():
    """Under dynamic shapes a user pattern's check decides on the symbolic sizes, so its
    decision is guarded: a later size it refuses recompiles and runs eager's op instead
    of reaching a replacement that cannot do it.  (It used to be decided at the first
    size's hint with no guard: N=12 ran the multiple-of-8 'kernel', wrong by up to 4.)"""
    calls = []

    def gelu8(x):  # handles the last dim in blocks of 8 only: the tail stays zero
        calls.append(x.shape[-1])
        n = x.shape[-1] // 8 * 8
        out = torch.zeros_like(x)
        out[..., :n] = torch.nn.functional.gelu(x[..., :n])
        return out

    def check(x):
        return x.shape[-1] % 8 == 0 or f"last dim {x.shape[-1]} is not a multiple of 8"

    def fn(x):
        return torch.nn.functional.gelu(x) * 2

    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            lambda x: torch.nn.functional.gelu(x),
            name="test_gelu8",
            replacement=gelu8,
            example_inputs=[("f", (4, 16))],
            check=check,
        )
        torch._dynamo.reset()
        calls.clear()  # (registration ran it on its examples)
        be = tilebackend.TileBackend(options={"fallback": "eager"})
        compiled = torch.compile(fn, backend=be, dynamic=True)
        for n in (16, 24, 12, 7):
            x = torch.randn(3, n)
            torch.testing.assert_close(compiled(x), fn(x))
    assert [c for c in calls if isinstance(c, int)] == [16, 24]
    first = be.report.graphs[0]
    assert first.symbolic and any("Mod" in g for g in first.guards_added), str(be.report)
    assert be.report.graphs[-1].counts == {}  # the recompile for 12 left gelu to eager


def test_user_pattern_matches_only_the_dtypes_it_was_traced_for():
    """A user pattern's replacement was validated for the input dtypes it was traced with
    (one per ``dtypes=`` entry); inputs of other dtypes, mixed ones included, are left to
    the fallback with a reason.  (fp16 ``a`` with fp32 ``b`` used to match the fp32
    variant: the replacement returned fp16 where eager promotes to fp32, and the next
    ``@ w_fp32`` raised.)"""
    calls = []

    def swiglu_impl(a, b):
        calls.append((a.dtype, b.dtype))
        return torch.empty_like(a).copy_(torch.nn.functional.silu(a.float()) * b.float())

    def fn(a, b, w):
        return (torch.nn.functional.silu(a) * b) @ w

    w = torch.randn(16, 5)
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            lambda a, b: torch.nn.functional.silu(a) * b,
            name="test_swiglu_dt",
            replacement=swiglu_impl,
            example_inputs=[("f", (4, 16)), ("f", (4, 16))],
            dtypes=[torch.float32, torch.float16],
        )
        for a_dt, b_dt, used in [
            (torch.float16, torch.float32, False),
            (torch.float32, torch.float32, True),
            (torch.bfloat16, torch.bfloat16, False),  # not in dtypes=
        ]:
            torch._dynamo.reset()
            calls.clear()
            a, b = torch.randn(3, 16, dtype=a_dt), torch.randn(3, 16, dtype=b_dt)
            be = tilebackend.TileBackend(options={"fallback": "eager"})
            out = torch.compile(fn, backend=be)(a, b, w.to(torch.promote_types(a_dt, b_dt)))
            ref = fn(a, b, w.to(torch.promote_types(a_dt, b_dt)))
            assert out.dtype == ref.dtype
            torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
            assert bool(calls) == used, (a_dt, b_dt, calls)
            assert ("test_swiglu_dt" in be.report.counts) == used
            if not used:
                assert "dtypes: inputs (a, b) are" in str(be.report), str(be.report)
