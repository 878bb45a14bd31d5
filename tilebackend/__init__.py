"""tilebackend: ``torch.compile(model, backend="tile")`` swaps the subgraphs our
hand-written Triton tile kernels cover (matmul, softmax, layer/RMS norm) into the graph.

Importing this package touches no GPU and compiles nothing; the built-in patterns and
kernels load on the first compile.
"""

from __future__ import annotations

from .api import (
    TensorSpec,
    patterns,
    register_pattern,
    temporary_patterns,
    unregister_pattern,
)
from .backend import TileBackend, tile_backend
from .codegen._common import count_launches
from .exc import TileError
from .explain import explain
from .report import Report
from .settings import Settings
from .tune import tune

__version__ = "0.1.0"

__all__ = [
    "Report",
    "Settings",
    "TensorSpec",
    "TileBackend",
    "TileError",
    "count_launches",
    "explain",
    "patterns",
    "register_pattern",
    "temporary_patterns",
    "tile_backend",
    "tune",
    "unregister_pattern",
]
