"""Kernel benchmarks (eager vs Inductor vs tile) at the anchors' shapes, plus sweeps.

    python benchmarks/kernels.py --out results/kernels [--quick] [--max-autotune] [--cases softmax]

Same options as ``python -m tilebackend bench`` (this is ``bench --what kernels``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilebackend.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--what", "kernels", *sys.argv[1:]]))
