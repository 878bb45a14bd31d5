"""Benchmarks: eager vs Inductor vs the tile backend, on kernels and on real models.

``python -m tilebackend bench --help`` runs them; ``benchmarks/`` holds thin entry
scripts and the one-shot GPU script.  Modules:

- ``common``  — providers (how each one compiles), timing, ceilings, errors, time budget
- ``kernels`` — the anchor shapes of each kernel family, plain and fused, and size sweeps
- ``models``  — GPT-2, BERT, a Llama-style decoder and ViT from ``transformers`` configs,
  saved to / loaded from a local checkpoint (``config.json`` + ``model.safetensors``)
- ``output``  — the result store (JSON, CSV, markdown), plots, and the comparison table
- ``cli``     — the ``bench`` subcommand

Importing this package imports nothing heavy (no torch, no transformers).
"""
