"""Compile every config of every kernel's tuning space for a GPU target, without a GPU.

``python -m tilebackend.codegen.compile_check [--capability 90] [--json]`` prints one line
per failure (a compile error, or shared memory over the Hopper limit) and a summary,
with the registers and the spills (``stack`` bytes a thread, read by ``cuobjdump``) of
each config (``--json``): a config that spills is rejected untimed by the autotuner on
a GPU, so a heuristic config must not.
It must run where TRITON_INTERPRET is unset: interpreted kernels cannot be compiled.
Pointer arguments (and the ``divisible`` ints a spec names) get Triton's 16-byte
divisibility hint, as the JIT gives aligned tensors, so the pipelining (and the shared
memory) measured is what a real launch gets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

MODULES = (
    "softmax",
    "layer_norm",
    "rms_norm",
    "matmul",
    "fused_matmul",
    "fused_matmul_multi",
    "fused_matmul_sum",
    "dual_matmul",
    "grouped_matmul",
    "fused_softmax",
    "fused_norm",
    "norm_epilogue",
    "dropout",
)


def _specs(module: str) -> list[dict]:
    import importlib

    return importlib.import_module(f"tilebackend.codegen.{module}").sm90_specs()


def _compile_one(job: tuple[str, int, int]) -> dict:
    module, index, capability = job
    from tilebackend.codegen import _common

    spec = _specs(module)[index]
    hinted = [n for n, t in spec["signature"].items() if t.startswith("*")]
    hinted += list(spec.get("divisible", ()))
    try:
        kernel = _common.compile_for_target(
            spec["fn"],
            spec["signature"],
            spec["constexprs"],
            num_warps=spec["num_warps"],
            num_stages=spec["num_stages"],
            capability=capability,
            divisible=hinted,
        )
    except Exception as e:
        return {"name": spec["name"], "error": f"{type(e).__name__}: {str(e)[:400]}"}
    shared = int(kernel.metadata.shared)
    res = {"name": spec["name"], "shared": shared}
    res.update(_common.resource_usage(kernel) or {})
    if shared > _common.HOPPER_SMEM_BYTES:
        res["error"] = f"shared memory {shared} B > {_common.HOPPER_SMEM_BYTES} B"
    return res


def run(capability: int = 90, modules=MODULES, workers: int | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    jobs = [(m, i, capability) for m in modules for i in range(len(_specs(m)))]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_one, jobs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tilebackend.codegen.compile_check")
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--json", action="store_true")
    p.add_argument("--modules", nargs="*", default=list(MODULES))
    args = p.parse_args(argv)
    results = run(args.capability, args.modules)
    fails = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps(results))
    else:
        for r in fails:
            print(f"FAIL {r['name']}: {r['error']}")
        worst = max((r.get("shared", 0) for r in results), default=0)
        spill = sorted((r for r in results if r.get("stack")), key=lambda r: -r["stack"])
        for r in spill:
            print(f"spills {r['stack']} B/thread ({r['regs']} registers): {r['name']}")
        print(
            f"COMPILED {len(results) - len(fails)}/{len(results)} (max shared {worst} B, "
            f"{len(spill)} spill)"
        )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
