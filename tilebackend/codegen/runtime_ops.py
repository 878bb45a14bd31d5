"""Dispatch-light twins of the ``tile::`` custom ops, for the graphs we hand over to run.

An op made by ``torch.library.custom_op`` runs Python autograd and redispatch layers
on every call (about 30 µs on a 2-core CPU, as much again as an ATen ``addmm``), which a
compiled forward or backward graph never needs: AOTAutograd has already taken the
op's derivative, and those graphs run without autograd.  So each functional
``tile::X`` (and user ``tile_user::X``) gets a twin ``tile_rt::X`` with the same schema,
implementation and fake, registered ``CompositeExplicitAutograd`` with no autograd
formula: one C++ dispatch, then the implementation.  The backend swaps graph targets to
the twins last, after the report has recorded the graph (which keeps the ``tile::``
names).  Twins are defined lazily, on first use.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .. import _compat

__all__ = ["NAMESPACES", "define_all", "twin"]

#: the namespaces whose ops get twins: ours and users' (tilebackend.api)
NAMESPACES = ("tile", "tile_user")

_lib: list[torch.library.Library] = []
_twins: dict[Any, Any] = {}
_lock = threading.Lock()
_all_defined: list[bool] = []


def twin(op: Any) -> Any | None:
    """The dispatch-light twin of ``op`` (an ``OpOverload``), or None when it has none:
    not one of :data:`NAMESPACES`, not made by ``custom_op``, or mutating."""
    hit = _twins.get(op, _twins)
    if hit is not _twins:
        return hit
    with _lock:
        if op not in _twins:
            _twins[op] = _define(op)
    return _twins[op]


def define_all() -> None:
    """Define the twin of every built-in ``tile::`` op.  A graph served from
    AOTAutograd's cache calls twins that our rewrite (which defines them as it goes)
    never ran to define in this process."""
    if _all_defined:
        return
    import importlib
    import pkgutil

    from .. import codegen

    for m in pkgutil.iter_modules(codegen.__path__):  # (the modules that define tile ops)
        importlib.import_module(f"{codegen.__name__}.{m.name}")
    for name in _compat.namespace_op_names("tile"):
        packet = getattr(torch.ops.tile, name)
        for overload in packet.overloads():
            twin(getattr(packet, overload))
    _all_defined.append(True)


def _define(op: Any) -> Any | None:
    if not isinstance(op, torch._ops.OpOverload) or op.namespace not in NAMESPACES:
        return None
    schema = op._schema
    parts = _compat.custom_op_parts(op)
    if parts is None or schema.is_mutable:
        return None
    impl, fake = parts
    name = schema.name.split("::", 1)[1]
    if op.namespace != "tile":
        name = f"{op.namespace}__{name}"
    if schema.overload_name:
        name = f"{name}__{schema.overload_name}"
    if not _lib:
        _lib.append(torch.library.Library("tile_rt", "FRAGMENT"))
    lib = _lib[0]
    text = str(schema)
    lib.define(name + text[text.index("(") :])
    lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tile_rt::{name}", fake, lib=lib)
    return getattr(torch.ops.tile_rt, name).default
