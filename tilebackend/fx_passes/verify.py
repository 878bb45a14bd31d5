"""``options={"verify": True}``: check every replacement against the graph it replaced.

On a rewritten graph's first call, the original ATen graph and the rewritten one both run
(eagerly, on clones of the real inputs, from the same RNG state) and their outputs are
compared at the tolerance of the least precise dtype each output is computed from.  When
they differ, each pattern used in the graph is tried alone to find the offenders; the
graph is rewritten again without them, checked once more, and that graph serves this and
every later call.  One warning is given per graph, and the report gets a note plus a
``Skipped`` entry per reverted replacement.

Granularity is per pattern and per graph: every replacement made by an offending pattern
in that graph is reverted (other graphs are checked on their own).  With the Inductor
fallback, a graph that needed reverting runs as eager ATen from then on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .. import _compat, settings
from ..report import GraphReport, Skipped

log = logging.getLogger("tilebackend")

#: (atol, rtol) per dtype: how far a kernel may differ from the ATen it replaces
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCE.get(dtype, (0.0, 0.0))


def _looser(a: torch.dtype | None, b: torch.dtype | None) -> torch.dtype | None:
    """The less precise of two dtypes (only floating ones count; None if neither)."""
    a, b = (a if a in TOLERANCE else None), (b if b in TOLERANCE else None)
    if a is None or b is None:
        return a or b
    return b if TOLERANCE[b] > TOLERANCE[a] else a


def _dtypes_of(val: Any) -> list[torch.dtype]:
    if isinstance(val, torch.Tensor):
        return [val.dtype]
    if isinstance(val, (list, tuple)):
        return [d for v in val for d in _dtypes_of(v)]
    return []


def computed_in(gm: fx.GraphModule) -> list[torch.dtype | None]:
    """Per (flat) output of ``gm``: the least precise floating dtype of any value it is
    computed from (itself included).  An fp32 output computed from fp16 values carries
    fp16 rounding, so it is compared at fp16's tolerance, not fp32's."""
    loosest: dict[fx.Node, torch.dtype | None] = {}
    for n in gm.graph.nodes:
        d = None
        for t in _dtypes_of(n.meta.get("val")):
            d = _looser(d, t)
        for x in n.all_input_nodes:
            d = _looser(d, loosest.get(x))
        loosest[n] = d
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    flat = out if isinstance(out, (list, tuple)) else [out]
    return [loosest.get(v) if isinstance(v, fx.Node) else None for v in flat]


def compare(
    got: Any,
    ref: Any,
    where: str = "output",
    computed: Sequence[torch.dtype | None] | torch.dtype | None = None,
) -> str | None:
    """None when ``got`` matches ``ref`` (shapes, dtypes, values at the dtype's
    tolerance, or at that of ``computed``, the least precise dtype each output was
    computed from, when looser), else a sentence saying how it differs."""
    if isinstance(ref, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(ref):
            n = len(got) if isinstance(got, (list, tuple)) else 1
            return f"{where}: {n} value(s), expected {len(ref)}"
        per = computed if isinstance(computed, (list, tuple)) else [computed] * len(ref)
        for i, (g, r) in enumerate(zip(got, ref)):
            why = compare(g, r, f"{where} {i}", per[i] if i < len(per) else None)
            if why:
                return why
        return None
    if isinstance(ref, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where}: got {type(got).__name__}, expected a tensor"
        if tuple(got.shape) != tuple(ref.shape):
            return f"{where}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{where}: dtype {got.dtype}, expected {ref.dtype}"
        if got.device != ref.device:
            return f"{where}: device {got.device}, expected {ref.device}"
        if not ref.dtype.is_floating_point and not ref.dtype.is_complex:
            return None if torch.equal(got, ref) else f"{where}: values differ"
        dt = _looser(ref.dtype, computed if isinstance(computed, torch.dtype) else None)
        atol, rtol = tolerance(dt)
        g, r = got.detach(), ref.detach()
        if torch.allclose(g, r, atol=atol, rtol=rtol, equal_nan=True):
            return None
        err = (g.double() - r.double()).abs().nan_to_num(float("inf")).max().item()
        what = f"{dt}" if dt == ref.dtype else f"{dt} (a {ref.dtype} value computed from {dt})"
        return (
            f"{where}: max abs error {err:.3g} exceeds {what} tolerance (atol={atol}, rtol={rtol})"
        )
    if got is None and ref is None:
        return None
    try:
        same = bool(got == ref)
    except Exception:
        same = False
    return None if same else f"{where}: {got!r} != {ref!r}"


def random_outputs(gm: fx.GraphModule) -> set[int]:
    """Positions of ``gm``'s (flat) outputs that depend on a random draw (dropout's
    mask, ``rand``): a fused kernel draws its own stream, so those cannot be compared
    with the original's."""
    from .cse import draws_random

    drawn: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if draws_random(n.target) or any(x in drawn for x in n.all_input_nodes):
            drawn.add(n)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    flat = out if isinstance(out, (list, tuple)) else [out]
    return {i for i, v in enumerate(flat) if isinstance(v, fx.Node) and v in drawn}


def _without(values: Any, drop: set[int]) -> Any:
    if not drop:
        return values
    flat = values if isinstance(values, (list, tuple)) else [values]
    return [None if i in drop else v for i, v in enumerate(flat)]


def _clone(args: Sequence[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def rng_state():
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda


def set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Verifier:
    """A boxed compiled callable that checks its replacements on the first call.

    ``original``: the ATen graph before the rewrite.  ``rewritten``: after it, with
    ``compiled`` its fast callable (boxed).  ``rebuild(names)``: the original rewritten
    without the patterns in ``names`` (a fresh GraphModule and its GraphReport).
    """

    _boxed_call = True

    def __init__(
        self,
        original: fx.GraphModule,
        rewritten: fx.GraphModule,
        compiled: Callable,
        rebuild: Callable[[set[str]], tuple[fx.GraphModule, GraphReport]],
        report: GraphReport,
        scope: settings.Settings,
    ) -> None:
        self.original = original
        self.rewritten = rewritten
        self.compiled = compiled
        self.rebuild = rebuild
        self.report = report
        self.scope = scope
        self._fn: Callable | None = None
        # (an instance attribute: the wrappers AOTAutograd puts around a backward copy
        # ``__dict__``, and call it unboxed without the flag)
        self._boxed_call = True
        self.drawn = random_outputs(original)  # (compared: the others)
        self.computed = computed_in(original)

    def __getattr__(self, name: str) -> Any:  # Inductor's compiled-graph attributes
        compiled = self.__dict__.get("compiled")
        if compiled is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(compiled, name)

    def __call__(self, args: list[Any]) -> Any:
        if self._fn is not None:
            return self._fn(args)
        real = list(args)
        args.clear()  # boxed convention: the callee owns the inputs
        with settings.use(self.scope):
            self._fn, run_now = self._decide(real)
            return run_now(real)

    # --- the first call -------------------------------------------------------------

    def _run(self, gm: fx.GraphModule, args: Sequence[Any], rng) -> Any:
        """``gm``'s outputs on clones of ``args`` from the RNG state ``rng``, those that
        depend on random draws left out (None)."""
        set_rng_state(rng)
        with torch.no_grad():
            return _without(gm(*_clone(args)), self.drawn)

    def _compare(self, got: Any, ref: Any) -> str | None:
        return compare(got, ref, computed=self.computed)

    def _decide(self, args: list[Any]):
        rng = rng_state()
        ref = self._run(self.original, args, rng)
        why = self._compare(self._run(self.rewritten, args, rng), ref)
        if self.drawn:
            self.report.notes.append(
                f"verify: {len(self.drawn)} output(s) depend on random draws "
                "(a fused kernel draws its own stream): not compared"
            )
        if why is None:
            log.info("verify: graph %r: every replacement matches", self.report.name)
            return self.compiled, self._replay(self.compiled, rng)
        used = list(dict.fromkeys(r.pattern for r in self.report.replacements))
        offenders: dict[str, str] = {}
        for name in used:  # each pattern alone against the original
            alone, _ = self.rebuild({n for n in used if n != name})
            w = self._compare(self._run(alone, args, rng), ref)
            if w is not None:
                offenders[name] = w
        if not offenders:  # only wrong together: revert them all
            offenders = {n: why for n in used}
        fixed, fixed_report = self.rebuild(set(offenders))
        if self._compare(self._run(fixed, args, rng), ref) is not None:
            offenders = {n: offenders.get(n, why) for n in used}
            fixed, fixed_report = self.original, GraphReport(self.report.name)
        reverted = [r for r in self.report.replacements if r.pattern in offenders]
        self.report.replacements[:] = fixed_report.replacements
        self.report.skipped[:] = fixed_report.skipped + [
            Skipped(
                r.nodes[-1] if r.nodes else "?",
                " + ".join(r.targets),
                r.pattern,
                f"reverted by verify: {offenders[r.pattern]}",
            )
            for r in reverted
        ]
        msg = (
            f"tilebackend: verify: in the {self.report.name} graph, pattern(s) "
            + ", ".join(f"{n!r} ({w})" for n, w in offenders.items())
            + " differ from the ATen they replace; reverted for this graph"
        )
        self.report.notes.append(msg.replace("tilebackend: ", ""))
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        fn = _compat.make_boxed_func(fixed.forward)
        return fn, self._replay(fn, rng)

    @staticmethod
    def _replay(fn: Callable, rng) -> Callable:
        def run(args: list[Any]) -> Any:
            set_rng_state(rng)  # the real run sees the RNG state the checks saw
            return fn(args)

        return run
