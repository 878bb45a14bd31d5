"""Results: one store per output folder (``results.json``, ``results.csv``,
``results.md``, PNG plots), rewritten after every row so a run cut short keeps what it
measured; several runs into one folder merge (a row replaces the same name/provider).
Also the anchors (``shared/anchors/*.json``) and the comparison table printed last."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CSV_FIELDS = [
    "suite",
    "name",
    "provider",
    "status",
    "ms",
    "tflops",
    "gbps",
    "pct_ceiling",
    "tok_per_s",
    "compile_s",
    "compile_warm_s",
    "peak_mem_mb",
    "max_abs_err",
    "rel_err",
    "grad_rel_err",
    "n_replaced",
    "replaced",
    "tile_ran",
    "tile_launches",
    "family",
    "shape",
    "dtype",
    "mode",
    "model",
    "model_class",
    "tokens",
    "error",
]
KERNEL_PROVIDER_ORDER = [
    "eager",
    "inductor",
    "inductor_max_autotune",
    "inductor_cudagraphs",
    "tile",
    "tile_eager",
    "tile_cudagraphs",
]


def key(row: dict) -> tuple[str, str, str]:
    return (row.get("suite", ""), row["name"], row.get("provider") or "")


def anchor_key(row: dict) -> str:
    """How ``shared/anchors`` names a row: ``name.provider`` (ceilings: ``name``)."""
    return f"{row['name']}.{row['provider']}" if row.get("provider") else row["name"]


class ResultStore:
    def __init__(self, out_dir: str | Path, plots: bool = True) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plots = plots
        self.meta: dict[str, Any] = {}
        self.rows: list[dict] = []
        existing = self.dir / "results.json"
        if existing.exists():
            try:
                data = json.loads(existing.read_text())
                self.meta = data.get("meta", {})
                self.rows = data.get("rows", [])
            except Exception:
                pass

    def add(self, row: dict, write: bool = True) -> None:
        k = key(row)
        self.rows = [r for r in self.rows if key(r) != k]
        self.rows.append(row)
        if write:
            self.write(plots=False)

    def write(self, plots: bool | None = None) -> list[Path]:
        """Write JSON, CSV and markdown (and the plots); return the files written."""
        files = [self.dir / "results.json", self.dir / "results.csv", self.dir / "results.md"]
        files[0].write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        with open(files[1], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: _csv_value(r.get(k)) for k in CSV_FIELDS})
        files[2].write_text(markdown(self.rows, self.meta))
        if self.plots if plots is None else plots:
            files += write_plots(self.rows, self.dir, self.meta.get("env", {}).get("device", ""))
        return files


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, dict):
        return ", ".join(f"{k}:{n}" for k, n in sorted(v.items())) or "none"
    return str(v)


def _by_name(rows: Iterable[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["name"], {})[r.get("provider") or ""] = r
    return out


def speedup(row: dict, eager: dict | None) -> float | None:
    if not eager or row.get("ms") is None or eager.get("ms") is None or not row["ms"]:
        return None
    return eager["ms"] / row["ms"]


def markdown(rows: Sequence[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    lines = ["# tilebackend benchmarks", ""]
    env = meta.get("env", {})
    if env:
        lines.append(
            "- " + ", ".join(f"{k} {env[k]}" for k in ("device", "torch", "triton") if k in env)
        )
        if env.get("transformers"):
            lines.append(f"- transformers {env['transformers']}")
        lines.append(f"- date {env.get('date', '?')}")
        lines.append("")
    ceil = [r for r in rows if r.get("suite") == "ceiling"]
    if ceil:
        lines += [
            "## Ceilings (measured in this run)",
            "",
            "| ceiling | ms | rate |",
            "|---|---|---|",
        ]
        for r in ceil:
            rate = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r.get('tflops', 0):.0f} TFLOP/s"
            lines.append(f"| {r['name']} | {_fmt(r.get('ms'), '.4f')} | {rate} |")
        lines.append("")
    groups = [
        ("Kernels", [r for r in rows if r.get("suite") == "kernel" and not r.get("sweep")]),
        ("Kernel sweeps", [r for r in rows if r.get("suite") == "kernel" and r.get("sweep")]),
    ]
    for title, group in groups:
        if not group:
            continue
        lines += [
            f"## {title}",
            "",
            "| case | provider | ms | TFLOP/s or GB/s | % ceiling | vs eager | rel err "
            "| replaced | tile ran | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        by = _by_name(group)
        for name, provs in by.items():
            for p in _ordered(provs):
                r = provs[p]
                rate = r.get("tflops", r.get("gbps"))
                unit = " TF" if "tflops" in r else (" GB/s" if "gbps" in r else "")
                lines.append(
                    f"| {name} | {p} | {_fmt(r.get('ms'), '.4f')} | {_fmt(rate, '.0f')}{unit if rate else ''} "
                    f"| {_fmt(r.get('pct_ceiling'), '.0f')} | {_fmt(speedup(r, provs.get('eager')), '.2f')} "
                    f"| {_fmt(r.get('rel_err'), '.1e')} | {_fmt(r.get('replaced'))} "
                    f"| {_fmt(r.get('tile_ran'))} | {_note(r)} |"
                )
        lines.append("")
    models = [r for r in rows if r.get("suite") == "model"]
    if models:
        lines += [
            "## Models",
            "",
            "| model | provider | ms | tokens/s | vs eager | compile s (cold/warm) "
            "| peak MiB | rel err | grad rel err | replaced | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, provs in _by_name(models).items():
            for p in _ordered(provs):
                r = provs[p]
                comp = f"{_fmt(r.get('compile_s'), '.1f')}/{_fmt(r.get('compile_warm_s'), '.1f')}"
                lines.append(
                    f"| {name} | {p} | {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('tok_per_s'), '.0f')} "
                    f"| {_fmt(speedup(r, provs.get('eager')), '.2f')} | {comp} "
                    f"| {_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('rel_err'), '.1e')} "
                    f"| {_fmt(r.get('grad_rel_err'), '.1e')} | {_fmt(r.get('n_replaced'))} | {_note(r)} |"
                )
        lines.append("")
    return "\n".join(lines)


def _note(r: dict) -> str:
    if r.get("status") in (None, "ok"):
        return ""
    return f"{r['status']}: {r.get('error', '')}".replace("|", "/")[:160]


def _ordered(provs: dict[str, Any]) -> list[str]:
    order = {p: i for i, p in enumerate(KERNEL_PROVIDER_ORDER)}
    return sorted(provs, key=lambda p: order.get(p, 99))


# --- plots ---------------------------------------------------------------------------


def write_plots(rows: Sequence[dict], out_dir: Path, device: str = "") -> list[Path]:
    """PNG plots when matplotlib imports (else none): model speedups vs eager, kernel
    % of ceiling, and the sweeps' rates."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    written = []
    models = [r for r in rows if r.get("suite") == "model" and r.get("ms")]
    if models:
        path = out_dir / "models_speedup.png"
        by = _by_name(models)
        _bars(
            plt,
            {
                n: {p: speedup(r, provs.get("eager")) for p, r in provs.items()}
                for n, provs in by.items()
            },
            "speedup vs eager (higher is better)",
            path,
            title=device,
            hline=1.0,
        )
        written.append(path)
    kern = [r for r in rows if r.get("suite") == "kernel" and not r.get("sweep") and r.get("ms")]
    if kern:
        path = out_dir / "kernels_roofline.png"
        by = _by_name(kern)
        _bars(
            plt,
            {n: {p: r.get("pct_ceiling") for p, r in provs.items()} for n, provs in by.items()},
            "% of measured ceiling (mm rate / copy bandwidth)",
            path,
            title=device,
            hline=100.0,
        )
        written.append(path)
    sweeps = [r for r in rows if r.get("suite") == "kernel" and r.get("sweep") and r.get("ms")]
    if sweeps:
        path = out_dir / "sweeps.png"
        fams = sorted({r.get("family", "?") for r in sweeps})
        fig, axes = plt.subplots(1, len(fams), figsize=(4.5 * len(fams), 3.6), squeeze=False)
        for ax, fam in zip(axes[0], fams):
            for p in KERNEL_PROVIDER_ORDER:
                pts = sorted(
                    (r["sweep_x"], r.get("pct_ceiling") or 0)
                    for r in sweeps
                    if r.get("family") == fam and r.get("provider") == p and r.get("sweep_x")
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_title(fam)
            ax.set_xlabel("row length" if fam != "mm" else "M = N = K")
            ax.set_ylabel("% of ceiling")
            ax.legend(fontsize=7)
        fig.suptitle(f"kernel sweeps {device}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _bars(plt, data: dict, ylabel: str, path: Path, hline=None, title: str = ""):
    names = list(data)
    provs = [p for p in KERNEL_PROVIDER_ORDER if any(p in d for d in data.values())]
    width = 0.8 / max(1, len(provs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.2))
    for i, p in enumerate(provs):
        xs = [j + i * width for j in range(len(names))]
        ys = [data[n].get(p) or 0 for n in names]
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.6, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- anchors and the comparison table ------------------------------------------------


def load_anchors(anchor_dir: str | Path | None, device_name: str) -> tuple[str | None, dict]:
    """The anchor file measured on this card (matched by device name, else by "H100"/
    "H200" in it): (file name, {row name: row}).  (None, {}) when none matches."""
    if not anchor_dir or not Path(anchor_dir).is_dir():
        return None, {}
    files = sorted(Path(anchor_dir).glob("*.json"))
    datas = []
    for f in files:
        try:
            datas.append((f, json.loads(f.read_text())))
        except Exception:
            continue
    pick = next((fd for fd in datas if fd[1].get("device") == device_name), None)
    if pick is None:
        for tag in ("H200", "H100", "A100", "B200"):
            if tag in device_name:
                pick = next((fd for fd in datas if tag in str(fd[1].get("device", ""))), None)
                break
    if pick is None:
        return None, {}
    return pick[0].name, {r["name"]: r for r in pick[1].get("rows", [])}


def comparison_table(rows: Sequence[dict], anchors: dict | None = None, anchor_file=None) -> str:
    """tile vs eager vs Inductor for every case, with the anchors' numbers beside ours."""
    anchors = anchors or {}
    cols = ["eager", "inductor", "tile", "tile_eager"]
    head = (
        f"{'case':44} "
        + " ".join(f"{c + ' ms':>13}" for c in cols)
        + f" {'tile/eager':>10} {'tile/ind':>8} {'anc eager':>9} {'anc ind':>8} {'eager/anc':>9}"
        + f" {'tile/anc ind':>12}"
    )
    out = [
        "=" * len(head),
        "tilebackend: tile vs eager vs inductor (speedups: >1 = tile faster; "
        "anc = anchors"
        + (f" {anchor_file}" if anchor_file else ": none for this device")
        + "; eager/anc: this box's eager time over the anchor's; tile/anc ind: anchor "
        "Inductor time over tile's)",
        "=" * len(head),
        head,
        "-" * len(head),
    ]
    ceil = [r for r in rows if r.get("suite") == "ceiling"]
    for r in ceil:
        a = anchors.get(r["name"])
        rate = r.get("gbps", r.get("tflops"))
        arate = (a or {}).get("gbps", (a or {}).get("tflops"))
        out.append(
            f"{r['name']:44} {_fmt(r.get('ms'), '.4f'):>13} rate {_fmt(rate, '.0f')}"
            + (f"  anchor {_fmt(arate, '.0f')} ({rate / arate:.2f}x)" if arate and rate else "")
        )
    for suite in ("kernel", "model"):
        by = _by_name(r for r in rows if r.get("suite") == suite)
        for name, provs in by.items():
            ms = {c: (provs.get(c) or {}).get("ms") for c in cols}
            tile = ms["tile"] or ms["tile_eager"]
            t_e = ms["eager"] / tile if tile and ms["eager"] else None
            t_i = ms["inductor"] / tile if tile and ms["inductor"] else None
            ae = (anchors.get(f"{name}.eager") or {}).get("ms")
            ai = (anchors.get(f"{name}.inductor") or {}).get("ms")
            ratio = ms["eager"] / ae if ae and ms["eager"] else None
            t_ai = ai / tile if ai and tile else None
            cells = []
            for c in cols:
                r = provs.get(c)
                if r is None:
                    cells.append(f"{'':>13}")
                elif r.get("status") != "ok":
                    cells.append(f"{r.get('status', '?')[:13]:>13}")
                else:
                    cells.append(f"{_fmt(r.get('ms'), '.4f'):>13}")
            out.append(
                f"{name[:44]:44} "
                + " ".join(cells)
                + f" {_fmt(t_e, '.2f'):>10} {_fmt(t_i, '.2f'):>8} {_fmt(ae, '.4f'):>9}"
                f" {_fmt(ai, '.4f'):>8} {_fmt(ratio, '.2f'):>9} {_fmt(t_ai, '.2f'):>12}"
            )
    graphs = _by_name(r for r in rows if r.get("provider", "").endswith("_cudagraphs"))
    if graphs:
        out.append("-" * len(head))
        out.append("with CUDA graphs (mode=reduce-overhead): tile vs Inductor")
        for name, provs in graphs.items():
            t = (provs.get("tile_cudagraphs") or {}).get("ms")
            i = (provs.get("inductor_cudagraphs") or {}).get("ms")
            out.append(
                f"{name[:44]:44} inductor {_fmt(i, '.4f'):>10} tile {_fmt(t, '.4f'):>10}"
                f"  tile/ind {_fmt(i / t if i and t else None, '.2f'):>6}"
            )
    errs = [r for r in rows if r.get("status") == "error"]
    if errs:
        out.append("-" * len(head))
        out.append(f"{len(errs)} error(s):")
        for r in errs[:20]:
            out.append(f"  {r['name']} [{r.get('provider')}]: {r.get('error', '')[:200]}")
    notrun = [
        r
        for r in rows
        if r.get("provider", "").startswith("tile")
        and r.get("status") == "ok"
        and not r.get("tile_ran")
    ]
    if notrun:
        out.append(
            "tile kernels did not run in: "
            + ", ".join(f"{r['name']}[{r['provider']}]" for r in notrun)
        )
    out.append("=" * len(head))
    return "\n".join(out)
