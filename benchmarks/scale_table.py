"""One table of stages x shapes from ``blockpilot bench scale`` JSON reports.

Each report is one run of one shape; a shape may be measured over several runs (a stage rerun after a fix, or
with other options): pass them oldest first and a later run's stage replaces an earlier one's. A cell is
``wall s / peak RSS GiB (x weights)`` for a stage that passed, ``refused: ...`` where the stage refused up front
(a ``MemoryBudgetError``), ``failed`` or ``timed out`` with the last line of its error otherwise.

    .venv/bin/python benchmarks/scale_table.py benchmarks/results/scale_*_2026-12-07_final.json \
        --out benchmarks/results/scale_table.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

STAGES = ("write", "load", "plan-torch", "quantize-fp8", "quantize-nvfp4", "export", "rtx-fp16", "rtx-fp8",
          "inspect", "verify", "plan-ort", "eval", "ros-configure")


def _cell(stage: dict[str, Any]) -> str:
    status = stage["status"]
    err = (stage.get("error") or "").strip().splitlines()
    last = err[-1] if err else ""
    if status == "passed":
        x = stage.get("rss_x_weights")
        rss = stage.get("peak_rss_bytes")
        cell = f"{stage['wall_s']:.0f} s / {rss / 2**30:.2f} GiB" if rss else f"{stage['wall_s']:.0f} s"
        return cell + (f" ({x:.2f}x)" if x is not None else "")
    refusal = re.search(r"needs about ([0-9.]+ GB).*only ([0-9.]+ GB) is available", last)
    if refusal:
        return f"refused up front: needs {refusal[1]}, {refusal[2]} available"
    return f"{status}: {last[-90:]}"


def build_table(paths: list[Path]) -> str:
    shapes: dict[str, dict[str, Any]] = {}
    for path in paths:
        report = json.loads(path.read_text())
        entry = shapes.setdefault(report["shape"], {"report": report, "stages": {}, "files": []})
        entry["files"].append(path.name)
        for stage in report["stages"]:
            if stage["status"] == "skipped" and stage["name"] in entry["stages"]:
                continue
            entry["stages"][stage["name"]] = stage
    names = list(shapes)
    out = ["| stage | " + " | ".join(f"{n} ({shapes[n]['report']['weight_bytes'] / 1e9:.2f} GB bf16)"
                                       for n in names) + " |",
           "|---|" + "---|" * len(names)]
    for stage in STAGES:
        if not any(stage in shapes[n]["stages"] for n in names):
            continue
        cells = [_cell(shapes[n]["stages"][stage]) if stage in shapes[n]["stages"] else "not run" for n in names]
        out.append(f"| {stage} | " + " | ".join(cells) + " |")
    out.append("")
    for n in names:
        m = shapes[n]["report"]["machine"]
        out.append(f"- {n}: {shapes[n]['report']['published_as']}; {m['cpu']}, {m['cpu_count']} CPUs, "
                   f"{m['ram_bytes'] / 2**30:.1f} GiB RAM, device {m['device']}; runs: {', '.join(shapes[n]['files'])}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = build_table(args.reports)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
