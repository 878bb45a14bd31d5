"""``python -m tilebackend demo``: compile the embedded model with backend="tile"."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    import tilebackend
    from tilebackend.codegen import _common
    from tilebackend.models import TinyTransformer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not tilebackend._compat.interpret_mode():
        # No GPU: run the same Triton kernels in Triton's CPU interpreter.  This works
        # because no kernel module has been imported (decorated) yet.
        os.environ["TRITON_INTERPRET"] = "1"
        print("[demo] no GPU: running the Triton kernels in Triton's CPU interpreter")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = TinyTransformer(norm=args.norm).to(device=device, dtype=dtype)
    tokens = torch.randint(0, 97, (args.batch, args.seq), device=device)
    options = {"fallback": args.fallback} if args.fallback else None
    report = tilebackend.explain(model, tokens, tile_options=options)
    print(report)
    compiled = torch.compile(model, backend="tile", options=options)
    with _common.count_launches() as launches:
        out = compiled(tokens)
    ref = model(tokens)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"\ndevice={device} dtype={args.dtype} batch={args.batch} seq={args.seq}")
    print(f"tile kernel launches in one forward: {dict(launches)}")
    print(f"max |tile - eager| = {err:.3e}")
    if args.train:
        model.zero_grad()
        compiled(tokens).sum().backward()
        g_tile = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(tokens).sum().backward()
        gerr = max((a - p.grad).abs().max().item() for a, p in zip(g_tile, model.parameters()))
        print(f"training step: max |grad tile - grad eager| = {gerr:.3e}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        print("[tune] no GPU: Triton interpreter, nothing is timed (heuristic configs)")
    import tilebackend
    from tilebackend.models import TinyTransformer

    torch.manual_seed(0)
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    model = TinyTransformer().to(device=device, dtype=getattr(torch, dtype))
    tokens = torch.randint(0, 97, (args.batch, args.seq), device=device)
    options = {"tune_budget_s": args.search_budget_s} if args.search_budget_s else None
    data = tilebackend.tune(
        model, tokens, budget_s=args.budget_s, out=args.out, options=options, backward=args.train
    )
    print(f"wrote {data['path']}: {len(data['entries'])} entries for {data['device']}")
    return 0


def _positive(kind: type):
    """An argparse type: a number above zero (a usage error names the flag otherwise)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not above zero")
        return v

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors found before any work: a device this machine has not, an output
    folder that cannot be written (a tuning run would fail only at its end)."""
    device = getattr(args, "device", None)
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {device}: no CUDA device is available here")
    out = getattr(args, "out", None)
    if args.cmd == "tune" and out:
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            p.error(f"--out {out}: folder {folder} does not exist")
        import tempfile

        try:  # (the artifact is written atomically: a temp file in that folder, renamed)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".tilebackend-probe-"):
                pass
        except OSError as e:
            p.error(f"--out {out}: cannot write in {folder} ({e.strerror or e})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tilebackend")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile the embedded transformer and show the report")
    d.add_argument("--device", default=None)
    d.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    d.add_argument("--batch", type=_positive(int), default=2)
    d.add_argument("--seq", type=_positive(int), default=16)
    d.add_argument("--norm", default="layer", choices=["layer", "rms"])
    d.add_argument("--fallback", default=None, choices=["eager", "inductor"])
    d.add_argument("--train", action="store_true", help="also compare one backward pass")
    t = sub.add_parser("tune", help="tune the kernels of a model ahead of time, write an artifact")
    t.add_argument("--model", default="tiny", choices=["tiny"])
    t.add_argument("--out", default="tilebackend-tuning.json")
    t.add_argument("--budget-s", type=_positive(float), default=None, help="cap on the whole run")
    t.add_argument(
        "--search-budget-s", type=_positive(float), default=None, help="cap on one search"
    )
    t.add_argument("--device", default=None)
    t.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    t.add_argument("--batch", type=_positive(int), default=2)
    t.add_argument("--seq", type=_positive(int), default=16)
    t.add_argument("--train", action="store_true", help="also tune the backward kernels")
    from tilebackend.bench import cli as bench_cli

    b = sub.add_parser("bench", help="benchmark kernels and models: eager vs inductor vs tile")
    bench_cli.add_arguments(b)
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.cmd == "bench":
        return bench_cli.run(args)
    if args.cmd == "tune":
        return _tune(args)
    if args.cmd == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
