"""What the user sets (``Settings``), kept apart from what is tuned (``codegen.autotune.Config``).

Every setting can come from ``torch.compile(..., options={...})`` or from its env var.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

from .exc import InvalidOptionValueError, UnknownOptionError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_bool(var: str, default: bool, name: str) -> bool:
    """The env var ``var`` as a bool (``1/true/yes/on``, ``0/false/no/off``), ``default``
    when unset; a clear error naming it otherwise."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise InvalidOptionValueError(
        name=name, value=raw, expected=f"1/true/yes/on or 0/false/no/off (env {var})"
    )


def _env_choice(var: str, name: str, choices: tuple[str, ...]) -> str:
    """The env var ``var``, one of ``choices`` (the first when unset)."""
    raw = (os.environ.get(var) or "").strip() or choices[0]
    if raw not in choices:
        raise InvalidOptionValueError(
            name=name, value=raw, expected=" | ".join(map(repr, choices)) + f" (env {var})"
        )
    return raw


def _env_number(var: str, name: str, default: Any, kind: type, what: str) -> Any:
    """``kind(env var)`` (float, int), ``default`` when unset; a clear error naming
    ``what`` the value should be when it does not parse."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise InvalidOptionValueError(
            name=name, value=raw, expected=f"{what} (env {var})"
        ) from None


@dataclasses.dataclass(frozen=True)
class Settings:
    #: Where the graph parts that no tile kernel covers go: "inductor", "eager", or
    #: "auto" (Inductor when the graph has GPU tensors, eager otherwise).  env TILEBACKEND_FALLBACK
    fallback: str = "auto"
    #: "on": time configs on the GPU; "off": heuristics only.  env TILEBACKEND_AUTOTUNE
    autotune: str = "on"
    #: Pattern names to enable exclusively (empty = all registered).  env TILEBACKEND_ENABLE (comma list)
    enable: tuple[str, ...] = ()
    #: Pattern names to disable.  env TILEBACKEND_DISABLE (comma list)
    disable: tuple[str, ...] = ()
    #: Fill kernel outputs with NaN (or a sentinel) before launching, so an unwritten
    #: element cannot pass a test.  env TILEBACKEND_POISON
    poison_outputs: bool = False
    #: How far a GPU tuning search goes on a cache miss: "quick" (the heuristic config and
    #: a few neighbours, a couple of seconds at most) or "exhaustive" (the whole pruned
    #: space, or random sampling + local search when it is large, within tune_budget_s).
    #: mode="max-autotune" selects "exhaustive".  env TILEBACKEND_SEARCH
    search: str = "quick"
    #: Seconds one exhaustive search (one kernel, one shape bucket) may take; a quick
    #: search takes at most min(this, 2).  env TILEBACKEND_TUNE_BUDGET_S
    tune_budget_s: float = 30.0
    #: Path of a tuning artifact (``python -m tilebackend tune`` / ``tilebackend.tune``)
    #: whose configs are used before the cache or a search.  env TILEBACKEND_TUNING
    tuning: str | None = None
    #: On each rewritten graph's first call, run every replacement beside the ATen it
    #: replaced (on the real inputs) and revert those whose results differ beyond the
    #: dtype's tolerance, with one warning and a report entry.  env TILEBACKEND_VERIFY
    verify: bool = False
    #: Grow each tile anchor into its pointwise neighbours (matmul epilogues, softmax
    #: scale/mask prologues, residual add + norm).  env TILEBACKEND_FUSION
    fusion: bool = True
    #: Under ``dynamic=True`` Dynamo makes a module's float attributes (an RMS norm's
    #: ``eps``, an attention's ``scaling``) graph inputs, which no pattern can read as a
    #: constant: ask Dynamo to re-trace with them constant (it guards each value, so a
    #: changed one recompiles; the report lists them).  env TILEBACKEND_SPECIALIZE_FLOATS
    specialize_floats: bool = True
    #: With the Inductor fallback, let AOTAutograd's cache serve a warm compile (the key
    #: carries everything our rewrite depends on; see ``compile_cache``).  env
    #: TILEBACKEND_COMPILE_CACHE
    compile_cache: bool = True
    #: Threads that compile a tuning search's candidate configs before it times them
    #: (Triton's compiler and ptxas release the GIL); None: min(8, CPUs), 1: one after
    #: another.  env TILEBACKEND_COMPILE_THREADS
    compile_threads: int | None = None

    _BOOLS = ("poison_outputs", "fusion", "verify", "specialize_floats", "compile_cache")
    _CHOICES = {
        "fallback": ("auto", "inductor", "eager"),
        "autotune": ("on", "off"),
        "search": ("quick", "exhaustive"),
    }

    @classmethod
    def from_env(cls) -> Settings:
        def names(var: str) -> tuple[str, ...]:
            return tuple(s.strip() for s in os.environ.get(var, "").split(",") if s.strip())

        choices = cls._CHOICES
        return cls(
            fallback=_env_choice("TILEBACKEND_FALLBACK", "fallback", choices["fallback"]),
            autotune=_env_choice("TILEBACKEND_AUTOTUNE", "autotune", choices["autotune"]),
            enable=names("TILEBACKEND_ENABLE"),
            disable=names("TILEBACKEND_DISABLE"),
            poison_outputs=_env_bool("TILEBACKEND_POISON", False, "poison_outputs"),
            search=_env_choice("TILEBACKEND_SEARCH", "search", choices["search"]),
            tune_budget_s=_env_number(
                "TILEBACKEND_TUNE_BUDGET_S", "tune_budget_s", 30.0, float, "a number of seconds"
            ),
            tuning=os.environ.get("TILEBACKEND_TUNING") or None,
            verify=_env_bool("TILEBACKEND_VERIFY", False, "verify"),
            fusion=_env_bool("TILEBACKEND_FUSION", True, "fusion"),
            specialize_floats=_env_bool("TILEBACKEND_SPECIALIZE_FLOATS", True, "specialize_floats"),
            compile_cache=_env_bool("TILEBACKEND_COMPILE_CACHE", True, "compile_cache"),
            compile_threads=_env_number(
                "TILEBACKEND_COMPILE_THREADS", "compile_threads", None, int, "a whole number"
            ),
        )._validated()

    @classmethod
    def valid_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def with_options(self, options: Mapping[str, Any] | None) -> Settings:
        """Return settings updated by ``options``; unknown names raise with the valid list."""
        if not options:
            return self
        valid = self.valid_names()
        updates: dict[str, Any] = {}
        for name, value in options.items():
            if name not in valid:
                raise UnknownOptionError(name=name, valid=", ".join(valid))
            if name in ("enable", "disable"):
                if isinstance(value, str):
                    value = (value,)
                if not isinstance(value, (list, tuple, set, frozenset)) or not all(
                    isinstance(v, str) for v in value
                ):
                    raise InvalidOptionValueError(
                        name=name, value=value, expected="a pattern name or a list of names"
                    )
                value = tuple(value)
            if name == "tuning" and isinstance(value, os.PathLike):
                value = os.fspath(value)
            updates[name] = value
        return dataclasses.replace(self, **updates)._validated()

    def _validated(self) -> Settings:
        for name, choices in self._CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise InvalidOptionValueError(
                    name=name, value=value, expected=" | ".join(map(repr, choices))
                )
        for name in self._BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidOptionValueError(
                    name=name, value=getattr(self, name), expected="a bool"
                )
        budget = self.tune_budget_s
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise InvalidOptionValueError(
                name="tune_budget_s", value=budget, expected="a positive number of seconds"
            )
        threads = self.compile_threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise InvalidOptionValueError(
                name="compile_threads", value=threads, expected="None or a whole number >= 1"
            )
        if self.tuning is not None:
            if not isinstance(self.tuning, str) or not self.tuning:
                raise InvalidOptionValueError(
                    name="tuning", value=self.tuning, expected="the path of a tuning artifact"
                )
            # a missing, corrupt or tampered artifact is an error here, not at launch time
            from .codegen.tuning_cache import load_artifact

            load_artifact(self.tuning)
        return self


_current: list[Settings] = []


def current() -> Settings:
    """The settings in force: the innermost ``use(...)`` scope, else the environment."""
    return _current[-1] if _current else Settings.from_env()


@contextlib.contextmanager
def use(settings: Settings) -> Iterator[Settings]:
    """Scope ``settings`` (used while compiling and by tests: no global mutation)."""
    _current.append(settings)
    try:
        yield settings
    finally:
        _current.pop()
