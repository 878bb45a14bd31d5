"""The README's ``## Results`` section, written from a benchmark run's ``results.json``.

    python -m tilebackend.bench.readme RESULTS_DIR [--readme README.md]

prints the section (date, card, versions; per case: eager, Inductor and tile times, the
ratios, tile's % of the measured ceiling) and, with ``--readme``, replaces that file's
section with it (from ``## Results`` to the next ``## `` heading).  A run on CPU or a
run with no tile row is refused: the README shows GPU numbers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .output import _by_name, _fmt

HEADING = "## Results"
_TILE = ("tile", "tile_eager")


def _ms(provs: dict[str, dict], name: str) -> float | None:
    r = provs.get(name)
    return r.get("ms") if r and r.get("status") == "ok" else None


def _tile(provs: dict[str, dict]) -> tuple[str | None, dict | None]:
    for p in _TILE:
        r = provs.get(p)
        if r and r.get("status") == "ok" and r.get("ms"):
            return p, r
    return None, None


def section(data: dict[str, Any], source: str = "") -> str:
    """The ``## Results`` section for one run (``{"meta", "rows"}`` of results.json)."""
    env = data.get("meta", {}).get("env", {})
    rows = data.get("rows", [])
    device = str(env.get("device", ""))
    if not device or device == "cpu" or "cpu" in device.lower():
        raise ValueError(f"not a GPU run (device {device!r}): the README shows GPU numbers")
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers") if env.get(k))
    dtypes = sorted({str(r["dtype"]) for r in rows if r.get("dtype")})
    if dtypes:
        versions += "; " + ", ".join(dtypes)
    lines = [
        HEADING,
        "",
        f"Measured on **{device}**, {env.get('date', '?')} ({versions}), "
        f"with `benchmarks/gpu_oneshot.sh`{f' ({source})' if source else ''}. "
        "Times are medians; ratios above 1 mean tile is faster. % ceiling is tile's rate "
        "over the copy bandwidth or the bf16 matmul rate measured in the same run.",
        "",
    ]
    ceil = [r for r in rows if r.get("suite") == "ceiling" and r.get("ms")]
    if ceil:
        rates = []
        for r in ceil:
            rate = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r.get('tflops', 0):.0f} TFLOP/s"
            rates.append(f"{r['name'].removeprefix('ceiling.')} {rate}")
        lines += ["Ceilings: " + ", ".join(rates) + ".", ""]
    head = [
        "| case | eager ms | Inductor ms | tile ms | tile vs eager | tile vs Inductor "
        "| tile % ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    wrote = False
    for suite, title in (("kernel", "Kernels"), ("model", "Models")):
        by = _by_name(r for r in rows if r.get("suite") == suite and not r.get("sweep"))
        body = []
        for name, provs in by.items():
            p, t = _tile(provs)
            if t is None:
                continue
            e, i = _ms(provs, "eager"), _ms(provs, "inductor")
            pct = t.get("pct_ceiling")
            body.append(
                f"| {name}{'' if p == 'tile' else ' (fallback=eager)'} | {_fmt(e, '.4g')} "
                f"| {_fmt(i, '.4g')} | {_fmt(t['ms'], '.4g')} "
                f"| {_fmt(e / t['ms'] if e else None, '.2f')} "
                f"| {_fmt(i / t['ms'] if i else None, '.2f')} "
                f"| {_fmt(pct, '.0f') if pct is not None else ''} |"
            )
        if body:
            lines += [f"**{title}**", "", *head, *body, ""]
            wrote = True
    if not wrote:
        raise ValueError("the run has no tile row that finished: nothing to show")
    return "\n".join(lines).rstrip() + "\n"


def replace_section(readme: str, new: str) -> str:
    """``readme`` with its ``## Results`` section (to the next ``## `` heading, or the
    end) replaced by ``new``; appended when there is none."""
    lines = readme.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == HEADING), None)
    if start is None:
        return readme.rstrip("\n") + "\n\n" + new
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + new + ("\n" + tail if tail else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a benchmark output folder (or its results.json)")
    p.add_argument("--readme", default=None, help="replace this file's Results section")
    a = p.parse_args(argv)
    path = Path(a.results)
    path = path / "results.json" if path.is_dir() else path
    try:
        new = section(json.loads(path.read_text()), source=path.parent.name)
    except (OSError, ValueError) as e:
        print(f"tilebackend.bench.readme: {e}", file=sys.stderr)
        return 2
    print(new)
    if a.readme:
        readme = Path(a.readme)
        readme.write_text(replace_section(readme.read_text(), new))
        print(f"updated {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
