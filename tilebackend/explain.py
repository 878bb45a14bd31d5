"""``tilebackend.explain(fn_or_module, *args, **kwargs)``: what the backend does to a model."""

from __future__ import annotations

from typing import Any

import torch

from .backend import TileBackend
from .report import Report


def explain(fn_or_module: Any, *args: Any, **kwargs: Any) -> Report:
    """Compile ``fn_or_module`` with the tile backend, run it once on ``args``/``kwargs``
    and return the report: per graph, each replacement (pattern, nodes, shapes, dtypes)
    and each candidate left alone with the reason.

    Options may be passed as ``tile_options={...}`` and ``tile_mode="..."``; they are not
    forwarded to the model.
    """
    options = kwargs.pop("tile_options", None)
    mode = kwargs.pop("tile_mode", None)
    backend = TileBackend(mode=mode, options=options)
    compiled = torch.compile(fn_or_module, backend=backend)
    compiled(*args, **kwargs)
    return backend.report
