"""One exception class per failure, each with a message template."""

from __future__ import annotations


class TileError(Exception):
    """Base class of every error tilebackend raises on purpose."""

    template = "{msg}"

    def __init__(self, *args: object, **fields: object) -> None:
        if fields:
            msg = self.template.format(**fields)
        else:
            msg = " ".join(str(a) for a in args) if args else self.template
        super().__init__(msg)


class UnknownOptionError(TileError, ValueError):
    template = "unknown tilebackend option {name!r}; valid options are: {valid}"


class InvalidOptionValueError(TileError, ValueError):
    template = "tilebackend option {name!r} got {value!r}; expected {expected}"


class PatternError(TileError, ValueError):
    template = "pattern {name!r} is malformed: {reason}"


class DuplicatePatternError(TileError, ValueError):
    template = "a pattern named {name!r} is already registered (at {first}); second registration at {second}"


class PatternValidationError(PatternError):
    template = (
        "pattern {name!r}: the replacement does not reproduce the search function on the "
        "example inputs ({dtype}): {reason}"
    )


class KernelError(TileError, RuntimeError):
    template = "tile kernel {kernel!r} failed: {reason}"


class TuningArtifactError(TileError, ValueError):
    template = "tuning artifact {path!r} cannot be used: {reason}"
