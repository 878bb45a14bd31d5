"""The public custom-pattern API: register, prioritise, conflicts, validation, verify."""

from __future__ import annotations

import pathlib
import runpy
import warnings

import pytest
import torch
import torch.nn.functional as F

import tilebackend
from tilebackend.exc import (
    DuplicatePatternError,
    InvalidOptionValueError,
    PatternError,
    PatternValidationError,
)

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
F32 = (torch.float32,)
_EX = [("f", (4, 8))]


def _compile(fn, **options):
    torch._dynamo.reset()
    be = tilebackend.TileBackend(options={"fallback": "eager", **options})
    return torch.compile(fn, backend=be), be


def _example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")["main"]()


# --- the examples ---------------------------------------------------------------------


def test_example_swiglu_triton_kernel_runs():
    res = _example("swiglu_triton")
    assert res["report"].counts.get("swiglu") == 1, str(res["report"])
    assert res["launches"] >= 2  # explain's call and the compiled call
    assert "swiglu" not in tilebackend.patterns()  # temporary


def test_example_rope_training():
    res = _example("rope")
    assert res["report"].counts.get("rope") == 2, str(res["report"])
    assert res["calls"] >= 2


def test_example_gelu_op_replacement():
    res = _example("gelu_tanh")
    assert res["report"].counts.get("gelu_tanh") == 1, str(res["report"])
    # torch ops only: spliced as the op itself, no custom op
    assert not hasattr(torch.ops.tile_user, "gelu_tanh")


# --- registration and scoping -----------------------------------------------------------


def _swish(x):
    return x * torch.sigmoid(x)


def test_function_form_wraps_python_callable_and_scopes():
    calls = []

    def repl(x):  # a plain Python callable (not traceable by proxies): wrapped in a custom op
        calls.append(1)
        return F.silu(x.clone())

    with tilebackend.temporary_patterns():
        p = tilebackend.register_pattern(
            _swish,
            replacement=repl,
            example_inputs=[tilebackend.TensorSpec((4, 8))],
            name="swish_py",
            dtypes=F32,
        )
        assert "swish_py" in tilebackend.patterns() and p.priority == 0
        assert "test_api.py:" in p.origin
        fn = lambda x: _swish(x) + 1  # noqa: E731
        x = torch.randn(3, 5)
        for opts, expected in [({}, {"swish_py": 1}), ({"disable": ["swish_py"]}, {})]:
            compiled, be = _compile(fn, **opts)
            calls.clear()
            torch.testing.assert_close(compiled(x), fn(x))
            assert be.report.counts == expected
            assert bool(calls) == bool(expected)
        compiled, be = _compile(fn, enable=["softmax"])  # enable: only these
        compiled(x)
        assert be.report.counts == {}
    assert "swish_py" not in tilebackend.patterns()


def test_wrapped_replacement_with_index_and_mask_inputs_trains():
    """A wrapped replacement's backward differentiates the search function through its
    floating inputs only: an int64 index and a bool mask get no gradient.  (Compiling
    for training used to fail: "only Tensors of floating point dtype can require
    gradients".)"""
    calls = []

    def search(x, idx, m):
        return torch.where(m, x.gather(-1, idx) * 2, 0.0)

    def repl(x, idx, m):  # a plain Python callable: wrapped in a custom op
        calls.append(1)
        return torch.where(m, x.gather(-1, idx.clone()) * 2, 0.0)

    def examples(dt):
        return (torch.randn(4, 8, dtype=dt), torch.randint(0, 8, (4, 3)), torch.rand(4, 3) > 0.5)

    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            search, replacement=repl, example_inputs=examples, name="gather_where", dtypes=F32
        )
        compiled, be = _compile(lambda x, idx, m: search(x, idx, m).sin().sum())
        x = torch.randn(5, 7, requires_grad=True)
        idx, m = torch.randint(0, 7, (5, 3)), torch.rand(5, 3) > 0.5
        calls.clear()
        compiled(x, idx, m).backward()
        (g,) = torch.autograd.grad(search(x, idx, m).sin().sum(), x)
    torch.testing.assert_close(x.grad, g)
    assert calls and be.report.counts == {"gather_where": 1}


def test_example_inputs_drawn_under_the_inductor_fallback():
    """Example inputs given as specs draw a seed; the Inductor fallback rewrites inference
    graphs under its fake mode, where that draw could not run: the pattern was dropped with
    a warning (explain, on the eager fallback, said it matched)."""
    calls = []

    def repl(x):
        calls.append(1)
        return F.softplus(x.clone()) * 2

    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            lambda x: F.softplus(x) * 2,
            replacement=repl,
            example_inputs=[("f", (4, 8))],
            name="softplus2",
            dtypes=F32,
        )
        torch._dynamo.reset()
        be = tilebackend.TileBackend(options={"fallback": "inductor"})
        fn = lambda x: F.softplus(x) * 2 + 1  # noqa: E731
        x = torch.randn(3, 8)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with torch.no_grad():
                torch.testing.assert_close(torch.compile(fn, backend=be)(x), fn(x))
    assert calls and be.report.counts == {"softplus2": 1}, str(be.report)


def test_unregistering_a_pattern_compiled_graphs_use_warns_once():
    """Compiled graphs keep the replacement they were compiled with; removing a pattern
    they use says so (once), and removing one nothing compiled with says nothing."""
    fn = lambda x: _swish(x) + 1  # noqa: E731
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with tilebackend.temporary_patterns():
            tilebackend.register_pattern(
                _swish, replacement=torch.ops.aten.silu, example_inputs=_EX, name="used_swish"
            )
            tilebackend.register_pattern(
                _swish, replacement=torch.ops.aten.silu, example_inputs=_EX, name="idle_swish"
            )
            compiled, be = _compile(fn, disable=["idle_swish"])
            compiled(torch.randn(3, 8))
            assert be.report.counts == {"used_swish": 1}
    said = [str(m.message) for m in w if "unregistered" in str(m.message)]
    assert len(said) == 1 and "'used_swish'" in said[0] and "compiled again" in said[0], said


def test_builtin_can_be_disabled_by_name():
    compiled, be = _compile(lambda x: torch.softmax(x, -1), disable=["softmax"])
    compiled(torch.randn(3, 4))
    assert be.report.counts == {}


def test_duplicate_name_names_both_places():
    with tilebackend.temporary_patterns():
        kw = dict(replacement=lambda x: torch.ops.aten.silu(x), example_inputs=[("f", (4, 8))])
        tilebackend.register_pattern(_swish, name="dup", dtypes=F32, **kw)
        line = _lineno() + 2
        with pytest.raises(DuplicatePatternError) as ei:
            tilebackend.register_pattern(_swish, name="dup", dtypes=F32, **kw)
    msg = str(ei.value)
    assert msg.count("test_api.py:") == 2 and f"test_api.py:{line}" in msg, msg
    with pytest.raises(DuplicatePatternError, match="softmax"):
        tilebackend.register_pattern(_swish, name="softmax", dtypes=F32, **kw)


def _lineno() -> int:
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_unregister_unknown_and_options_unknown():
    with pytest.raises(KeyError, match="no pattern named 'nope'.*softmax"):
        tilebackend.unregister_pattern("nope")
    compiled, _ = _compile(lambda x: x + 1, disable=["nope"])
    with pytest.raises(Exception, match="nope"):
        compiled(torch.randn(2))
    assert issubclass(InvalidOptionValueError, tilebackend.TileError)
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            _swish, replacement=torch.ops.aten.silu, example_inputs=[("f", (4,))], dtypes=F32
        )
        tilebackend.unregister_pattern("_swish")
        assert "_swish" not in tilebackend.patterns()


# --- validation at registration -----------------------------------------------------------


def test_search_that_does_not_trace():
    def data_dependent(x):
        return x * 2 if x.sum() > 0 else x

    with pytest.raises(PatternError, match="does not trace"):
        tilebackend.register_pattern(
            data_dependent, replacement=lambda x: x * 2, example_inputs=[("f", (4,))], dtypes=F32
        )
    assert "data_dependent" not in tilebackend.patterns()


def _ignores_b(a, b):
    return torch.sigmoid(a) * 2


def _no_input():
    return torch.ones(3)


def _adds_one_in_place(a):
    return a.add_(1)


def _two_separate_results(a, b):
    return a + b, a * b


def _result_and_its_input(a, b):  # (fine: the sum is on the way to the first output)
    s = a + b
    return s.sin(), s


@pytest.mark.parametrize(
    "search, examples, msg",
    [
        (_ignores_b, [("f", (4, 8)), ("f", (4, 8))], "does not use its input.* b"),
        (_no_input, [], "reads no tensor input"),
        (_adds_one_in_place, [("f", (4, 8))], "mutates a tensor in place"),
        (
            _two_separate_results,
            [("f", (4, 8)), ("f", (4, 8))],
            r"output 1 \(aten.mul.Tensor\) is not computed on the way to output 0",
        ),
    ],
)
def test_search_a_graph_cannot_match(search, examples, msg):
    """Search functions no graph can match the way they are written are refused at
    registration (they used to register, then fail every rewrite of a graph holding
    their op, built-in replacements included)."""
    with pytest.raises(PatternError, match=msg):
        tilebackend.register_pattern(
            search, replacement=search, example_inputs=examples, dtypes=F32, validate=False
        )
    assert search.__name__ not in tilebackend.patterns()


def test_an_output_on_the_way_to_the_first_is_matched():
    """The other side of the rule above: a second output the first is computed from is
    found by the match, replaced, and its users read the replacement's value."""
    calls = []

    def repl(a, b):
        calls.append(1)
        s = (a + b).clone()
        return s.sin(), s

    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            _result_and_its_input,
            replacement=repl,
            example_inputs=[("f", (4, 8)), ("f", (4, 8))],
            dtypes=F32,
        )
        fn = lambda a, b: (a + b).sin() * (a + b).exp()  # noqa: E731
        compiled, be = _compile(fn)
        a, b = torch.randn(3, 5), torch.randn(3, 5)
        torch.testing.assert_close(compiled(a, b), fn(a, b))
    assert calls and be.report.counts == {"_result_and_its_input": 1}, str(be.report)


@pytest.mark.parametrize(
    "replacement, msg",
    [
        (lambda x: torch.sigmoid(x).reshape(-1), r"shape \(32,\), expected \(4, 8\)"),
        (lambda x: torch.sigmoid(x).double(), "dtype torch.float64"),
        (lambda x: torch.sigmoid(x) + 0.1, "max abs error"),
        (lambda x: (torch.sigmoid(x), x), "2 value"),
        (lambda x: 1 / 0, "ZeroDivisionError"),
        (lambda x: x.sigmoid_(), "changes its input.* x in place"),
    ],
)
def test_replacement_must_reproduce_search(replacement, msg):
    with pytest.raises(PatternValidationError, match=msg):
        tilebackend.register_pattern(
            lambda x: torch.sigmoid(x),
            replacement=replacement,
            example_inputs=torch.randn(4, 8),
            name="bad_sigmoid",
            dtypes=F32,
        )
    assert "bad_sigmoid" not in tilebackend.patterns()


# --- conflicts ----------------------------------------------------------------------------


def _silu_only(a):
    return F.silu(a)


def _silu_mul(a, b):
    return F.silu(a) * b


@pytest.mark.parametrize("outer_wins", [True, False])
def test_overlap_resolved_by_priority_and_reported(outer_wins):
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            _silu_mul,
            replacement=lambda a, b: torch.ops.aten.mul.Tensor(torch.ops.aten.silu(a), b),
            example_inputs=[("f", (4, 8))] * 2,
            priority=10 if outer_wins else 0,
            dtypes=F32,
        )
        tilebackend.register_pattern(
            _silu_only,
            replacement=lambda a: torch.ops.aten.silu(a),
            example_inputs=[("f", (4, 8))],
            priority=0 if outer_wins else 20,
            dtypes=F32,
        )
        fn = lambda a, b: _silu_mul(a, b) + 1  # noqa: E731
        compiled, be = _compile(fn)
        a, b = torch.randn(3, 8), torch.randn(3, 8)
        torch.testing.assert_close(compiled(a, b), fn(a, b))
    rep = be.report
    text = str(rep)
    if outer_wins:
        assert rep.counts == {"_silu_mul": 1}, text
        (lost,) = [s for s in rep.skipped if s.pattern == "_silu_only"]
        assert lost.reason == "lost to _silu_mul (priority 10 > 0)"
    else:
        assert rep.counts == {"_silu_only": 1}, text
        (lost,) = [s for s in rep.skipped if s.pattern == "_silu_mul"]
        assert lost.reason == "lost to _silu_only (priority 20 > 0)"
    assert "lost to" in text


# --- training with an autograd.Function replacement ---------------------------------------


class _SwishFn(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        _SwishFn.calls += 1
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


def test_autograd_function_keeps_its_backward():
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            _swish, replacement=_SwishFn, example_inputs=[("f", (4, 8))], name="swish_fn",
            dtypes=F32,
        )  # fmt: skip
        fn = lambda x: _swish(x).sum()  # noqa: E731
        compiled, be = _compile(fn)
        x = torch.randn(3, 5, requires_grad=True)
        _SwishFn.calls = 0
        compiled(x).backward()
        g, x.grad = x.grad, None
        fn(x).backward()
    torch.testing.assert_close(g, x.grad)
    assert be.report.counts == {"swish_fn": 1} and _SwishFn.calls >= 1


# --- verify ---------------------------------------------------------------------------------


def test_verify_reverts_wrong_replacement_with_one_warning():
    with tilebackend.temporary_patterns():
        tilebackend.register_pattern(
            _swish,
            replacement=lambda x: torch.ops.aten.silu(x) * 1.5,  # wrong on purpose
            example_inputs=[("f", (4, 8))],
            name="wrong_swish",
            dtypes=F32,
            validate=False,
        )
        fn = lambda x: torch.softmax(_swish(x), -1)  # noqa: E731
        compiled, be = _compile(fn, verify=True, enable=["wrong_swish", "softmax"])
        x = torch.randn(3, 8)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out1 = compiled(x)
            out2 = compiled(x + 1)
    torch.testing.assert_close(out1, fn(x))
    torch.testing.assert_close(out2, fn(x + 1))
    msgs = [str(m.message) for m in w if "verify" in str(m.message)]
    assert len(msgs) == 1 and "wrong_swish" in msgs[0], msgs
    rep = be.report
    assert rep.counts == {"softmax": 1}, str(rep)  # the right replacement stays
    (rev,) = [s for s in rep.skipped if s.pattern == "wrong_swish"]
    assert rev.reason.startswith("reverted by verify") and "max abs error" in rev.reason
    assert any("wrong_swish" in n for g in rep.graphs for n in g.notes)


def test_verify_judges_an_fp32_value_computed_from_fp16_at_fp16_tolerance():
    """fp16 attention in training: the fp32 softmax the backward saves is computed from
    fp16 scores, so it carries fp16 rounding; verify compares it at fp16's tolerance and
    keeps the kernels.  (At fp32's it blamed every pattern of the forward and reverted
    them all.)  The tolerance helper itself follows the least precise ancestor."""
    from tilebackend.fx_passes import verify

    def attn(s, v):
        return F.softmax(s * 0.3, -1, dtype=torch.float32).to(torch.float16) @ v

    torch.manual_seed(0)
    s = (torch.randn(2, 3, 8, 8) * 4).half().requires_grad_()
    v = torch.randn(2, 3, 8, 16, dtype=torch.float16, requires_grad=True)
    compiled, be = _compile(attn, verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with tilebackend.count_launches() as launches:
            compiled(s, v).sum().backward()
    assert launches["scale_mask_softmax_fwd"] == 2 and "softmax_fwd" not in launches
    assert not any("reverted" in x.reason for x in be.report.skipped), str(be.report)
    ref = torch.ones(3, dtype=torch.float32)
    off = ref + 5e-4
    assert verify.compare(off, ref) is not None  # fp32 computed from fp32: 1e-4
    assert verify.compare(off, ref, computed=torch.float16) is None
    assert "computed from torch.float16" in verify.compare(ref + 0.1, ref, computed=torch.float16)


def test_verify_with_the_inductor_fallback_runs_the_backward():
    """verify wraps the backward Inductor compiled; AOTAutograd's wrappers copy only an
    instance's ``__dict__``, so a class-level boxed flag was lost and the backward was
    called unboxed: "Verifier.__call__() takes 2 positional arguments but 8 were given"."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.LayerNorm(12))
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    be = tilebackend.TileBackend(options={"fallback": "inductor", "verify": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (and nothing reverted)
        with tilebackend.count_launches() as launches:
            (torch.compile(m, backend=be)(x) * torch.arange(12.0)).sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    (m(x) * torch.arange(12.0)).sum().backward()
    for g, p in zip(got, m.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    assert launches["layer_norm_bwd"] >= 1 and launches["mm"] >= 1, dict(launches)


def test_verify_leaves_random_draws_out_and_keeps_fused_dropout():
    """Training attention with dropout: the fused kernel draws its own stream, so the
    outputs that depend on the draws are not compared (the report says so); the rest
    are, and nothing is reverted (dropout used to make verify blame the softmax)."""
    import torch.nn.functional as F

    def attn(s, m):
        return F.dropout(torch.softmax(s * 0.3 + m, -1), 0.1, training=True)

    s, m = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(1, 1, 8, 8)
    compiled, be = _compile(attn, verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (ours; not numpy's)
        with tilebackend.count_launches() as launches:
            out = compiled(s, m)
            out.sum().backward()
    # (the first call runs each rewritten graph twice: the check, then the call)
    assert launches["scale_mask_softmax_dropout_fwd"] == 2, dict(launches)
    assert launches["scale_mask_softmax_bwd"] == 2, dict(launches)
    kept = out != 0
    p = torch.softmax(s * 0.3 + m, -1)
    torch.testing.assert_close(out[kept], (p / 0.9)[kept])
    counts = be.report.counts
    assert counts.get("fused_softmax_dropout") == 1, str(be.report)
    assert not [x for x in be.report.skipped if "reverted" in x.reason], str(be.report)
    fwd = [g for g in be.report.graphs if g.name == "forward"][0]
    assert any("random draws" in n for n in fwd.notes), fwd.notes
    bwd = [g for g in be.report.graphs if g.name == "backward"][0]
    assert not any("random draws" in n for n in bwd.notes)  # (all compared)


def test_verify_keeps_correct_replacements_silently():
    compiled, be = _compile(lambda x: torch.softmax(x, -1), verify=True)
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (ours; not numpy's)
        torch.testing.assert_close(compiled(x), torch.softmax(x, -1))
    assert be.report.counts == {"softmax": 1}


def test_bad_registration_arguments_and_env_values_name_the_problem(monkeypatch):
    """A check that is not a function, example inputs of the wrong kind, an option list
    that is not names, an env var that is not a bool or a choice: clear errors, each
    naming the problem (and the env var)."""
    with pytest.raises(PatternError, match="check must be a function"):
        tilebackend.register_pattern(
            _swish, replacement=torch.ops.aten.silu, example_inputs=[("f", (4,))], check="yes"
        )
    with pytest.raises(PatternError, match="example_inputs must be"):
        tilebackend.register_pattern(_swish, replacement=torch.ops.aten.silu, example_inputs=None)
    assert "_swish" not in tilebackend.patterns()
    with pytest.raises(InvalidOptionValueError, match="pattern name"):
        tilebackend.TileBackend(options={"enable": 5})
    monkeypatch.setenv("TILEBACKEND_POISON", "maybe")
    with pytest.raises(InvalidOptionValueError, match="TILEBACKEND_POISON"):
        tilebackend.TileBackend()
    monkeypatch.setenv("TILEBACKEND_POISON", "yes")
    monkeypatch.setenv("TILEBACKEND_FALLBACK", "tvm")
    with pytest.raises(InvalidOptionValueError, match="TILEBACKEND_FALLBACK"):
        tilebackend.TileBackend()
    monkeypatch.setenv("TILEBACKEND_FALLBACK", "eager")
    assert tilebackend.TileBackend().settings.poison_outputs is True
    from tilebackend.backend import configure_logging

    monkeypatch.setenv("TILEBACKEND_LOG", "verbose")  # (was logging's bare "Unknown level")
    with pytest.raises(InvalidOptionValueError, match="'verbose'.*'DEBUG'.*TILEBACKEND_LOG"):
        configure_logging()
