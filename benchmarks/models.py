"""End-to-end model benchmarks (GPT-2, BERT, Llama-style, ViT; or ``--checkpoint DIR``).

    python benchmarks/models.py --out results/models [--quick] [--models gpt2,llama] [--train gpt2]
    python benchmarks/models.py --out results/mine --checkpoint /path/to/hf_checkpoint_dir

Same options as ``python -m tilebackend bench`` (this is ``bench --what models``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilebackend.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--what", "models", *sys.argv[1:]]))
