"""Every config of every kernel's tuning space compiles for Hopper (sm_90) within its
shared memory, checked without a GPU (tilebackend.codegen.compile_check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tilebackend.codegen import _common, autotune, compile_check, dual_matmul, matmul


@pytest.mark.slow
def test_every_config_compiles_for_sm90():
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.pop("TRITON_DEFAULT_FP_FUSION", None)  # our kernels ask for FMA contraction
    proc = subprocess.run(
        [sys.executable, "-m", "tilebackend.codegen.compile_check", "--json"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    check_results(results, proc.stderr)


def _over_limit_without_a_split_twin(stack: dict, names, limit: int) -> list[str]:
    """Of ``names``, the configs spilling past ``limit`` whose ``_split`` twin (the one
    the heuristic starts from, and the tuner keeps: it rejects spilling configs) does not
    stay within it.  Triton 3.6 spills more in some whole-tile epilogues than 3.9."""
    return [
        n
        for n in names
        if stack[n] > limit and (n.endswith("_split") or stack.get(n + "_split", limit + 1) > limit)
    ]


def check_results(results: list[dict], stderr: str = "") -> None:
    """The assertions on ``compile_check --json``'s results (also run on a saved file)."""
    proc_stderr = stderr
    # triton 3.9 warns when a kernel leaves FMA contraction to its default (which 3.10
    # turns off); every tile kernel asks for it (_common.FP_FUSION)
    assert "TRITON_DEFAULT_FP_FUSION" not in proc_stderr, proc_stderr[-2000:]
    expected = sum(len(compile_check._specs(m)) for m in compile_check.MODULES)
    assert len(results) == expected
    assert len({r["name"] for r in results}) == expected
    bad = [r for r in results if "error" in r]
    assert not bad, bad
    assert max(r["shared"] for r in results) <= _common.HOPPER_SMEM_BYTES
    # the hints reach the compiler: the big fp16 matmul tiles are software-pipelined
    big = [r for r in results if r["name"].startswith("matmul_fp16_tf32_128x256x64")]
    assert big and big[0]["shared"] > 100_000, big
    # registers, read from the cubins: no half-precision GEMM config spills (a linear's
    # bias is read as a row, not a second tile of registers), nor does the heuristic's
    # 128 x 128 tile of the generated epilogues with a bias, a residual and a mask
    assert all("regs" in r and "stack" in r for r in results), results[0]
    spills = {r["name"]: r["stack"] for r in results if r["stack"]}
    half = ("matmul_fp16", "matmul_bf16", "dual_mm_epilogue_fp16", "dual_mm_epilogue_bf16")
    half += ("grouped_mm_fp16", "grouped_mm_bf16")
    assert not [n for n in spills if n.startswith(half) and not n.endswith("_wgrad")], spills
    # (the backward's grouped layout: its 16 x 64 x 128 tile spills a word or two)
    assert not [
        n for n, b in spills.items() if n.endswith("_wgrad") and b > 4 * autotune.SPILL_LIMIT
    ]
    # (the five-result one spills a few words: within what the autotuner accepts)
    stack = {r["name"]: r["stack"] for r in results}
    heur = [r["name"] for r in results if "_128x128x64_g8_w8_s4" in r["name"]]
    limit = 4 * autotune.SPILL_LIMIT
    assert len(heur) >= 6 and not _over_limit_without_a_split_twin(stack, heur, limit), spills
    # the persistent TMA configs (offered on Hopper for fp16/bf16 epilogues) compile for
    # the generated epilogue templates (fp16, bf16), within what the autotuner accepts
    tma = {r["name"]: r["stack"] for r in results if r["name"].endswith("_tma")}
    per_dtype = 2 * len(matmul.tma_configs(torch.bfloat16))  # mm_epilogue(_multi)
    per_dtype += len(dual_matmul.tma_configs(torch.bfloat16))
    per_dtype += 1  # mm_sum_epilogue: the heuristic's twin
    assert len(tma) == 2 * per_dtype, sorted(tma)
    assert not _over_limit_without_a_split_twin(stack, tma, limit), tma
    # half-precision epilogues on two column halves (EPI_SPLIT) spill less than their
    # whole-tile twins, in all (a config may move a few bytes either way between triton
    # versions), and their 128 x 128 tiles stay within what the tuner accepts
    split = [n for n in stack if n.endswith("_split") and ("_fp16_" in n or "_bf16_" in n)]
    assert len(split) >= 16, sorted(stack)
    whole = sum(stack[n.removesuffix("_split")] for n in split)
    assert sum(stack[n] for n in split) < whole, {n: stack[n] for n in split}
    for name in split:
        if "_128x128x64_" in name:
            assert stack[name] <= limit, (name, stack[name])
