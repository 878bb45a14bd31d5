"""``python -m tilebackend bench``: kernel and model benchmarks, eager vs Inductor vs tile.

Writes ``results.json``, ``results.csv``, ``results.md``, PNG plots (with matplotlib)
and ``comparison.txt`` into ``--out``, and prints the comparison table last.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

KERNEL_PROVIDERS = "eager,inductor,tile"
MODEL_PROVIDERS = "eager,inductor,tile,tile_eager"
REPO = Path(__file__).resolve().parents[2]


def _default_anchors() -> str | None:
    for cand in (REPO.parent / "shared" / "anchors", REPO / "shared" / "anchors"):
        if cand.is_dir():
            return str(cand)
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench", help="results folder (merged into)")
    p.add_argument("--what", default="all", choices=["kernels", "models", "all"])
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default bfloat16 on a GPU, float32 on CPU",
    )
    p.add_argument(
        "--size",
        default=None,
        choices=["anchor", "tiny"],
        help="anchor sizes (GPU default) or tiny ones (CPU default)",
    )
    p.add_argument(
        "--providers",
        default=None,
        help=f"comma list; kernels default {KERNEL_PROVIDERS}, models {MODEL_PROVIDERS}",
    )
    p.add_argument(
        "--max-autotune", action="store_true", help="add inductor_max_autotune (slow to compile)"
    )
    p.add_argument("--cases", default="", help="kernel cases whose name contains one of these")
    p.add_argument(
        "--sweeps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="size sweeps (default on, off with --quick)",
    )
    p.add_argument("--models", default="gpt2,llama,bert,vit", help="inference models")
    p.add_argument("--train", default="gpt2", help="models to time a training step of ('' = none)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 512 (tiny: 8)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a folder with config.json + model.safetensors: benchmark that model",
    )
    p.add_argument(
        "--ckpt-root",
        default=None,
        help="where built-in models' random checkpoints are written (default: tmp)",
    )
    p.add_argument(
        "--attn",
        default=None,
        choices=["sdpa", "eager"],
        help="transformers attention implementation (default: transformers')",
    )
    p.add_argument(
        "--warm-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time a second compile after torch._dynamo.reset() (default on, off with --quick)",
    )
    p.add_argument("--tile-autotune", default=None, choices=["on", "off"])
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; work that would not fit is skipped and recorded so",
    )
    p.add_argument(
        "--quick", action="store_true", help="shorter timing, no sweeps, no warm compile"
    )
    p.add_argument("--cpu-reps", type=int, default=3, help="timed repetitions on CPU")
    p.add_argument("--anchors", default=_default_anchors(), help="folder of anchor JSON files")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="print the comparison table of the results in --out and stop",
    )


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _progress(row: dict) -> str:
    head = f"{row.get('suite', '?'):6} {row['name']} [{row.get('provider') or '-'}]"
    if row.get("status") != "ok":
        return f"{head}: {row.get('status')} ({row.get('error', '')})"
    parts = [f"{row['ms']:.4f} ms"]
    if row.get("tflops") is not None:
        parts.append(f"{row['tflops']:.1f} TFLOP/s")
    if row.get("gbps") is not None:
        parts.append(f"{row['gbps']:.0f} GB/s")
    if row.get("pct_ceiling") is not None:
        parts.append(f"{row['pct_ceiling']:.0f}% of ceiling")
    if row.get("tok_per_s") is not None:
        parts.append(f"{row['tok_per_s']:.0f} tok/s")
    if row.get("compile_s") is not None:
        warm = row.get("compile_warm_s")
        parts.append(
            f"compile {row['compile_s']:.1f}s"
            + (f" (warm {warm:.1f}s)" if warm is not None else "")
        )
    if row.get("peak_mem_mb") is not None:
        parts.append(f"peak {row['peak_mem_mb']:.0f} MiB")
    if row.get("rel_err") is not None:
        parts.append(f"rel err {row['rel_err']:.1e}")
    if row.get("grad_rel_err") is not None:
        parts.append(f"grad rel err {row['grad_rel_err']:.1e}")
    if "replaced" in row:
        parts.append(f"replaced {row.get('n_replaced', 0)} {row['replaced']}")
        parts.append("tile ran" if row.get("tile_ran") else "TILE DID NOT RUN")
    return f"{head}: " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # like the demo: run the Triton kernels in the interpreter (must precede the
        # kernel modules' import, which happens on the first compile)
        os.environ["TRITON_INTERPRET"] = "1"
    from . import common, output

    store = output.ResultStore(args.out, plots=not args.no_plots)
    if args.table_only:
        return _print_table(store, args)
    import torch

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    profile = args.size or ("anchor" if device.startswith("cuda") else "tiny")
    quick = args.quick
    sweeps = args.sweeps if args.sweeps is not None else not quick
    warm = args.warm_compile if args.warm_compile is not None else not quick
    timing = (
        common.Timing(10, 40, args.cpu_reps) if quick else common.Timing(25, 100, args.cpu_reps)
    )
    model_timing = (
        common.Timing(20, 100, args.cpu_reps) if quick else common.Timing(50, 300, args.cpu_reps)
    )
    budget = common.Budget(args.time_budget)
    tile_options = {"autotune": args.tile_autotune} if args.tile_autotune else None
    env = common.environment(device)
    same_device = store.meta.get("env", {}).get("device") == env["device"]
    store.meta["env"] = env
    store.meta.setdefault("runs", []).append(
        {
            "what": args.what,
            "size": profile,
            "dtype": str(dtype),
            "quick": quick,
            "date": env["date"],
        }
    )
    common.log(
        f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"dtype {str(dtype).replace('torch.', '')}, sizes {profile}, out {store.dir}"
    )

    def sink(row: dict) -> None:
        store.add(row)
        common.log(_progress(row))

    if args.what in ("kernels", "all"):
        from . import kernels

        providers = common.check_providers(_split(args.providers or KERNEL_PROVIDERS))
        if args.max_autotune and "inductor_max_autotune" not in providers:
            providers.append("inductor_max_autotune")
        ceilings: dict[str, float] = {}
        names = {"ceiling.copy", "ceiling.mm8192" if profile == "anchor" else "ceiling.mm32"}
        old = [r for r in store.rows if r.get("name") in names and r.get("status") == "ok"]
        if same_device and len(old) == 2:  # measured by an earlier run into this folder
            common.log("using the ceilings measured earlier in this folder")
            rows = old
        else:
            rows = common.measure_ceilings(device, profile, timing, dtype)
            for row in rows:
                sink(row)
        for row in rows:
            ceilings.update({k: row[k] for k in ("gbps", "tflops") if k in row})
        cases = kernels.select(kernels.anchor_cases(profile), _split(args.cases))
        if sweeps:
            cases += kernels.select(kernels.sweep_cases(profile), _split(args.cases))
        common.log(f"{len(cases)} kernel case(s) x {providers}")
        kernels.run_kernels(
            cases,
            providers,
            device=device,
            dtype=dtype,
            ceilings=ceilings,
            timing=timing,
            budget=budget,
            sink=sink,
            tile_options=tile_options,
        )

    if args.what in ("models", "all"):
        from . import models

        why = models.available()
        if why:
            common.log(f"SKIPPING model benchmarks: {why} (pip install transformers safetensors)")
            store.meta["models_skipped"] = why
        else:
            providers = common.check_providers(_split(args.providers or MODEL_PROVIDERS))
            if args.max_autotune and "inductor_max_autotune" not in providers:
                providers.append("inductor_max_autotune")
            if "eager" in providers:  # eager first: it is the reference
                providers = ["eager"] + [p for p in providers if p != "eager"]
            tiny = profile == "tiny"
            batch = args.batch or (2 if tiny else 8)
            seq = args.seq or (8 if tiny else 512)
            root = Path(args.ckpt_root) if args.ckpt_root else models.default_checkpoint_root()
            common.log("preparing checkpoints (config.json + model.safetensors) ...")
            jobs = models.plan_jobs(
                _split(args.models),
                _split(args.train),
                profile=profile,
                batch=batch,
                seq=seq,
                device=device,
                checkpoint=args.checkpoint,
                ckpt_root=root,
            )
            for job in jobs:
                try:
                    models.run_job(
                        job,
                        providers,
                        device=device,
                        dtype=dtype,
                        batch=batch,
                        seq=seq,
                        attn=args.attn,
                        timing=model_timing,
                        budget=budget,
                        warm_compile=warm,
                        sink=sink,
                        tile_options=tile_options,
                    )
                except Exception as e:  # loading the model failed
                    for p in providers:
                        sink(
                            {
                                "suite": "model",
                                "name": job.name,
                                "provider": p,
                                "status": "error",
                                "error": common.short_error(e),
                            }
                        )
    store.meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    files = store.write(plots=not args.no_plots)
    common.log("wrote " + ", ".join(str(f) for f in files))
    return _print_table(store, args)


def _print_table(store, args) -> int:
    from . import output

    device_name = store.meta.get("env", {}).get("device", "")
    anchor_file, anchors = output.load_anchors(args.anchors, device_name)
    table = output.comparison_table(store.rows, anchors, anchor_file)
    (store.dir / "comparison.txt").write_text(table + "\n")
    print(table, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tilebackend bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
