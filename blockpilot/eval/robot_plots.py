"""Robot replay figures (matplotlib, the ``eval`` extra, as :mod:`blockpilot.eval.plots`): action L1 per chunk step
and per dimension, model against the repeat-last-action baseline, and the latency histogram the driving report
draws."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plots import CV, L2_SIZE, MODEL, latency_histogram, new_figure, rgb, save_png

SERIES = (("model", "model", MODEL), ("baseline", "repeat-last-action", CV))


def l1_figure(metrics: dict[str, Any], part: str, labels: Sequence[str]) -> Any:
    """Bars of mean action L1 per ``part`` (``per_step`` or ``per_dim``), model beside the baseline."""
    figure = new_figure(L2_SIZE)
    ax = figure.add_subplot()
    what = "chunk step" if part == "per_step" else "action dimension"
    ax.set_title(f"Action L1 per {what} (padded rows excluded)")
    x = np.arange(len(labels), dtype=np.float64)
    for k, (who, name, color) in enumerate(SERIES):
        table = (metrics[who].get("l1") or {}).get(part) or {}
        heights = [table.get(label) or 0.0 for label in labels]
        ax.bar(x - 0.18 + 0.36 * k, heights, width=0.34, color=rgb(color), label=name)
    ax.set_xticks(x, list(labels))
    ax.set_ylabel("mean |error|")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", color="0.9")
    figure.tight_layout()
    return figure


def write_robot_plots(records: Sequence[dict[str, Any]], metrics: dict[str, Any], plots_dir: Path) -> list[Path]:
    """``latency.png``, ``l1_per_step.png`` and ``l1_per_dim.png`` into ``plots_dir``."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    steps = [str(k) for k in range(metrics["steps"])]
    return [latency_histogram(records, plots_dir / "latency.png"),
            save_png(l1_figure(metrics, "per_step", steps), plots_dir / "l1_per_step.png"),
            save_png(l1_figure(metrics, "per_dim", metrics["dims"]), plots_dir / "l1_per_dim.png")]
