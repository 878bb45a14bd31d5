"""The benchmark harness at tiny sizes: kernels and a tiny GPT-2 through
``python -m tilebackend bench`` with providers eager and tile(fallback=eager), and the
files it writes.  On CPU the kernels run in Triton's interpreter (conftest)."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from tilebackend.__main__ import main
from tilebackend.bench import common, kernels, output

HAVE_MODELS = all(importlib.util.find_spec(m) for m in ("transformers", "safetensors"))
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
needs_models = pytest.mark.skipif(
    not HAVE_MODELS, reason="transformers and safetensors are not installed"
)


def bench(device, out, *extra):
    rc = main(
        [
            "bench",
            "--device",
            device,
            "--size",
            "tiny",
            "--dtype",
            "float32",
            "--providers",
            "eager,tile_eager",
            "--quick",
            "--cpu-reps",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    return data, {(r["name"], r["provider"]): r for r in data["rows"]}


def test_kernel_bench_files(device, tmp_path, capsys):
    out = tmp_path / "res"
    data, rows = bench(device, out, "--what", "kernels", "--cases", "softmax_16,mm32", "--sweeps")
    assert data["meta"]["env"]["torch"]
    for name in ("softmax_16x32", "mm32", "sweep.mm32"):
        eager, tile = rows[(name, "eager")], rows[(name, "tile_eager")]
        assert eager["status"] == "ok" and tile["status"] == "ok", (eager, tile)
        assert tile["n_replaced"] >= 1 and tile["tile_ran"], tile
        assert tile["rel_err"] < 1e-5
        assert tile["ms"] > 0 and tile["pct_ceiling"] is not None
    assert rows[("softmax_16x32", "tile_eager")]["replaced"] == {"softmax": 1}
    assert {r["name"] for r in data["rows"] if r["suite"] == "ceiling"} == {
        "ceiling.copy",
        "ceiling.mm32",
    }
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(data["rows"]) and "pct_ceiling" in csv_rows[0]
    md = (out / "results.md").read_text()
    assert (
        "## Kernels" in md and "## Kernel sweeps" in md and "| softmax_16x32 | tile_eager |" in md
    )
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-1].startswith("====")  # the comparison table is printed last
    assert (out / "comparison.txt").exists()
    if HAVE_MPL:
        assert (out / "kernels_roofline.png").stat().st_size > 1000
        assert (out / "sweeps.png").stat().st_size > 1000


@needs_models
def test_gpt2_infer_and_train(device, tmp_path):
    out, ckpt = tmp_path / "res", tmp_path / "ckpt"
    _, rows = bench(
        device,
        out,
        "--what",
        "models",
        "--models",
        "gpt2",
        "--train",
        "gpt2",
        "--ckpt-root",
        str(ckpt),
    )
    (saved,) = ckpt.iterdir()
    assert (saved / "config.json").exists() and (saved / "model.safetensors").exists()
    for mode in ("infer", "train"):
        name = f"gpt2_b2_t8_{mode}"
        eager, tile = rows[(name, "eager")], rows[(name, "tile_eager")]
        assert eager["status"] == "ok" and tile["status"] == "ok", (eager, tile)
        assert eager["loader"] == "safetensors"
        assert tile["n_replaced"] >= 1 and tile["tile_ran"], tile
        assert tile["tok_per_s"] > 0 and tile["compile_s"] > 0
        assert tile["rel_err"] < 1e-4
    assert rows[("gpt2_b2_t8_train", "tile_eager")]["grad_rel_err"] < 1e-3
    md = (out / "results.md").read_text()
    assert "## Models" in md and "gpt2_b2_t8_train" in md
    if HAVE_MPL:
        assert (out / "models_speedup.png").stat().st_size > 1000

    # the same harness on a user's checkpoint folder (eager only: the loading path)
    _, rows2 = main_rows(device, tmp_path / "res2", "--checkpoint", str(saved))
    (row,) = rows2.values()
    assert row["status"] == "ok" and row["model_class"] == "GPT2LMHeadModel"
    assert row["name"] == f"{saved.name.replace('-', '_')}_b2_t8_infer"


def main_rows(device, out, *extra):
    rc = main(
        ["bench", "--device", device, "--size", "tiny", "--dtype", "float32", "--quick"]
        + ["--what", "models", "--providers", "eager", "--train", "", "--out", str(out), *extra]
    )
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    return data, {(r["name"], r["provider"]): r for r in data["rows"]}


def tiny_case_rows(device, name, dtype):
    """The eager and tile_eager rows of the tiny kernel case ``name``, both ok."""
    rows = []
    case = kernels.select(kernels.anchor_cases("tiny"), [name])[0]
    kernels.run_case(
        case,
        ["eager", "tile_eager"],
        device=device,
        dtype=dtype,
        ceilings={},
        timing=common.Timing(cpu_reps=1),
        budget=common.Budget(600),
        sink=rows.append,
    )
    eager, tile = rows
    assert eager["status"] == tile["status"] == "ok", rows
    return eager, tile


@pytest.mark.parametrize(
    "name, kernel",
    [("attention_dropout", "scale_mask_softmax_dropout_fwd"), ("linear_dropout", "mm_epilogue")],
)
def test_random_case_compares_the_kept_elements(device, name, kernel):
    _, tile = tiny_case_rows(device, name, __import__("torch").float32)
    assert tile["tile_launches"] == {kernel: 1}, tile
    assert tile["rel_err"] < 1e-5 and 0.0 < tile["dropped"] < 0.5


def test_mpt_alibi_case_is_one_launch_in_half(device):
    """The MPT attention-probabilities case: fp16 scores, an fp32 ALiBi bias, a finite
    fill and the cast back to half all run in the one softmax kernel."""
    _, tile = tiny_case_rows(device, "alibi_softmax", __import__("torch").float16)
    assert tile["tile_launches"] == {"scale_mask_softmax_fwd": 1}, tile
    assert tile["replaced"] == {"softmax": 1, "fused_scale_mask_softmax": 1}, tile
    assert tile["rel_err"] < 1e-3


@pytest.mark.parametrize(
    "name",
    [
        "qkv_projection_16x32x32+32+32",
        "qkv_projection_16x32x32+8+8",
        "qkv_weight_grads_16x32x32+8+8",
    ],
)
def test_qkv_case_is_one_grouped_launch(device, name):
    """The query/key/value projection case (and its weight gradients') runs one grouped
    GEMM, and its error covers all three results."""
    eager, tile = tiny_case_rows(device, name, __import__("torch").float32)
    assert tile["tile_launches"] == {"grouped_mm": 1}, tile
    assert tile["replaced"].get("grouped_mm") == 1, tile
    assert eager["max_abs_err"] == 0 and tile["rel_err"] < 1e-5


def test_errors_cover_every_result():
    import torch

    ref = (torch.zeros(2), torch.ones(3))
    assert common.errors((torch.zeros(2), torch.ones(3)), ref)["max_abs_err"] == 0
    assert common.errors((torch.zeros(2), torch.full((3,), 3.0)), ref)["max_abs_err"] == 2


def test_time_budget_skips_compiles(device):
    rows = []
    case = kernels.select(kernels.anchor_cases("tiny"), ["softmax_16"])[0]
    kernels.run_case(
        case,
        ["eager", "tile_eager"],
        device=device,
        dtype=__import__("torch").float32,
        ceilings={},
        timing=common.Timing(cpu_reps=1),
        budget=common.Budget(1e-9),
        sink=rows.append,
    )
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert rows[1]["error"] == "time budget"


def test_results_merge_and_anchor_table(tmp_path):
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    (anchors / "h200.json").write_text(
        json.dumps(
            {
                "device": "NVIDIA H200",
                "rows": [
                    {"name": "ceiling.copy", "ms": 0.5, "gbps": 4000.0},
                    {"name": "softmax_49152x1024.eager", "ms": 0.08},
                    {"name": "softmax_49152x1024.inductor", "ms": 0.05},
                ],
            }
        )
    )
    store = output.ResultStore(tmp_path / "res", plots=False)
    store.add(
        {"suite": "ceiling", "name": "ceiling.copy", "provider": "", "ms": 0.6, "gbps": 3500.0}
    )
    for p, ms in (("eager", 0.1), ("inductor", 0.06), ("tile", 0.2), ("tile", 0.05)):
        store.add(
            {
                "suite": "kernel",
                "name": "softmax_49152x1024",
                "provider": p,
                "status": "ok",
                "ms": ms,
            }
        )
    again = output.ResultStore(tmp_path / "res")  # a second run merges into the same folder
    assert len(again.rows) == 4  # the second "tile" row replaced the first
    name, anc = output.load_anchors(anchors, "NVIDIA H200")
    assert name == "h200.json" and anc["softmax_49152x1024.eager"]["ms"] == 0.08
    assert output.load_anchors(anchors, "NVIDIA A10G") == (None, {})
    table = output.comparison_table(again.rows, anc, name)
    line = next(ln for ln in table.splitlines() if ln.startswith("softmax_49152x1024"))
    cells = line.split()
    assert cells[-6:] == ["2.00", "1.20", "0.0800", "0.0500", "1.25", "1.00"]
    assert "anchor 4000 (0.88x)" in table


def test_host_overhead_script(device, tmp_path):
    """benchmarks/host_overhead.py runs (in its own process: on CPU it stubs the
    interpreter's launches) and writes one row per op with the three timings."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    out = tmp_path / "host.json"
    env = {**os.environ, "TRITON_INTERPRET": "1" if device == "cpu" else "0"}
    res = subprocess.run(
        [sys.executable, str(script), "--device", device, "--calls", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [r["op"] for r in rows] == [
        "addmm",
        "gelu(addmm)",
        "layer_norm",
        "add + layer_norm",
        "softmax",
    ]
    for r in rows:
        assert r["aten_us"] > 0 and r["tile_rt_us"] > 0 and r["tile_us"] > 0, r
    assert "| addmm |" in res.stdout


def test_cuda_graph_providers(device):
    """inductor_cudagraphs / tile_cudagraphs compile (Inductor skips CUDA graphs for CPU
    graphs), the tile one with mode=reduce-overhead, and get their own table lines."""
    import torch

    from tilebackend.codegen import _common

    fn = lambda x: torch.softmax(x * 0.5, -1)  # noqa: E731
    x = torch.randn(4, 33, device=device)
    for provider in ("inductor_cudagraphs", "tile_cudagraphs"):
        compiled, backend = common.compile_provider(provider, fn)
        with _common.count_launches() as n:
            torch.testing.assert_close(compiled(x), fn(x), atol=1e-5, rtol=1e-5)
        if provider == "tile_cudagraphs":
            assert backend.mode == "reduce-overhead" and dict(n) == {"scale_mask_softmax_fwd": 1}
    rows = [
        {"suite": "model", "name": "gpt2_infer", "provider": p, "status": "ok", "ms": ms}
        for p, ms in (("inductor_cudagraphs", 2.0), ("tile_cudagraphs", 1.6))
    ]
    table = output.comparison_table(rows)
    assert "with CUDA graphs" in table and "tile/ind   1.25" in table, table


def _gpu_run() -> dict:
    env = {"device": "NVIDIA H200", "date": "2026-12-01T10:00:00", "torch": "2.11.0"}
    env["triton"] = "3.6.0"
    rows = [
        {"suite": "ceiling", "name": "ceiling.copy", "ms": 1.0, "gbps": 4200.0},
        {"suite": "kernel", "name": "softmax_4x12", "provider": "eager", "status": "ok"}
        | {"ms": 0.3, "dtype": "bfloat16"},
        {"suite": "kernel", "name": "softmax_4x12", "provider": "inductor", "status": "ok"}
        | {"ms": 0.2},
        {"suite": "kernel", "name": "softmax_4x12", "provider": "tile", "status": "ok"}
        | {"ms": 0.1, "pct_ceiling": 88.0},
        {"suite": "model", "name": "gpt2_b8_t512_infer", "provider": "eager", "status": "ok"}
        | {"ms": 7.0},
        {"suite": "model", "name": "gpt2_b8_t512_infer", "provider": "tile", "status": "error"},
        {"suite": "model", "name": "gpt2_b8_t512_infer", "provider": "tile_eager"}
        | {"status": "ok", "ms": 3.5},
    ]
    return {"meta": {"env": env}, "rows": rows}


def test_readme_results_section(tmp_path):
    from tilebackend.bench import readme

    text = readme.section(_gpu_run(), source="run1")
    assert "**NVIDIA H200**" in text and "triton 3.6.0" in text and "bfloat16" in text
    assert "copy 4200 GB/s" in text
    assert "| softmax_4x12 | 0.3 | 0.2 | 0.1 | 3.00 | 2.00 | 88 |" in text, text
    assert "| gpt2_b8_t512_infer (fallback=eager) | 7 | - | 3.5 | 2.00 | - |  |" in text, text
    old = "# T\n\nintro\n\n## Results\n\nNo GPU run yet.\n\n## Next\n\nkept\n"
    new = readme.replace_section(old, text)
    assert new.startswith("# T\n\nintro\n\n## Results\n") and "No GPU run" not in new
    assert new.endswith("\n## Next\n\nkept\n") and new.count("## Results") == 1
    assert readme.replace_section("# T\n", text).endswith(text)
    # the CLI, on a results folder
    (tmp_path / "results.json").write_text(json.dumps(_gpu_run()))
    md = tmp_path / "README.md"
    md.write_text(old)
    assert readme.main([str(tmp_path), "--readme", str(md)]) == 0
    assert "softmax_4x12" in md.read_text() and "kept" in md.read_text()


def test_readme_results_refuses_a_cpu_run(tmp_path):
    from tilebackend.bench import readme

    run = _gpu_run()
    run["meta"]["env"]["device"] = "cpu (Triton interpreter)"
    with pytest.raises(ValueError, match="not a GPU run"):
        readme.section(run)
    run = _gpu_run()
    run["rows"] = [r for r in run["rows"] if not r.get("provider", "").startswith("tile")]
    with pytest.raises(ValueError, match="no tile row"):
        readme.section(run)
    (tmp_path / "results.json").write_text(json.dumps(run))
    assert readme.main([str(tmp_path)]) == 2
