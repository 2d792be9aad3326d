"""Closed-loop driving report figures, in the look of the replay report's (:mod:`.plots`: the same colours, fixed
pixel sizes, an Agg canvas, PNGs written atomically): every policy's mean sub-scores as grouped bars, and the
distribution of PDMS and driving score over the episodes (a box per policy with every episode as a point).
matplotlib (the ``eval`` extra) is imported only to draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plots import AGENT_OTHER, CV, GT, INK, MODEL, RATER, Color, new_figure, rgb, save_png

SUBSCORES_SIZE = (900, 420)
DISTRIBUTION_SIZE = (900, 400)
SUBSCORES_FILE, DISTRIBUTION_FILE = "subscores.png", "score_distribution.png"
BAR_KEYS = (("NC", "nc"), ("DAC", "dac"), ("DDC", "ddc"), ("EP", "ep"), ("TTC", "ttc"), ("C", "comfort"),
            ("PDMS", "pdms"), ("RC", "route_completion"), ("DS", "driving_score"))
POLICY_COLORS: dict[str, Color] = {"model": MODEL, "compare": RATER, "expert": GT, "cv": CV}


def policy_color(name: str) -> Color:
    return POLICY_COLORS.get(name, AGENT_OTHER)


def subscores_figure(summary: dict[str, Any]) -> Any:
    """Grouped bars: per sub-score (and PDMS, RC, DS), one bar per policy, its mean over the episodes."""
    names = list(summary["policies"])
    figure = new_figure(SUBSCORES_SIZE)
    ax = figure.add_subplot()
    ax.set_title("Closed-loop sub-scores (mean over episodes)", color=rgb(INK))
    x = np.arange(len(BAR_KEYS), dtype=np.float64)
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        s = summary["policies"][name]
        heights = [s.get(key) or 0.0 for _, key in BAR_KEYS]
        ax.bar(x - 0.4 + width * (k + 0.5), heights, width=width * 0.95, color=rgb(policy_color(name)), label=name)
    ax.set_xticks(x, [label for label, _ in BAR_KEYS])
    ax.set_ylim(0.0, 1.08)
    ax.axvline(5.5, color=rgb(INK), linewidth=0.8)
    ax.set_ylabel("score (0..1)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", color="0.9")
    figure.tight_layout()
    return figure


def _scores(records: Sequence[dict[str, Any]], name: str, group: str, key: str) -> list[float]:
    return [float(r[group][key]) if r["status"] == "ok" else 0.0 for r in records if r["policy"] == name]


def distribution_figure(summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> Any:
    """PDMS and driving score per episode: a box per policy, each episode a point (a failed episode at 0)."""
    names = list(summary["policies"])
    figure = new_figure(DISTRIBUTION_SIZE)
    rng = np.random.default_rng(0)  # the points' horizontal jitter: the same picture run after run
    for panel, (title, group, key) in enumerate((("PDMS", "pdm", "pdms"),
                                                 ("Driving score", "driving", "driving_score"))):
        ax = figure.add_subplot(1, 2, panel + 1)
        data = [_scores(records, name, group, key) for name in names]
        ax.boxplot([d or [0.0] for d in data], positions=np.arange(len(names)), widths=0.5, showfliers=False,
                   medianprops={"color": rgb(INK)})
        for k, (name, values) in enumerate(zip(names, data, strict=True)):
            ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=14, color=rgb(policy_color(name), 0.8),
                       zorder=3)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{title} per episode", color=rgb(INK))
        ax.grid(axis="y", color="0.9")
    figure.tight_layout()
    return figure


def write_drive_plots(summary: dict[str, Any], records: Sequence[dict[str, Any]], plots_dir: Path) -> dict[str, Path]:
    """Both figures into ``plots_dir``; their paths by name (``subscores``, ``distribution``)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    return {"subscores": save_png(subscores_figure(summary), plots_dir / SUBSCORES_FILE),
            "distribution": save_png(distribution_figure(summary, records), plots_dir / DISTRIBUTION_FILE)}
