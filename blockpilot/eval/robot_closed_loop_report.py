"""The closed-loop run's ``report.html`` (and ``report.md``, the same blocks) with its plots (matplotlib, the
``eval`` extra, as :mod:`blockpilot.eval.robot_plots`): success rate per policy with its Wilson 95 % interval, the
episode-length histogram per policy, and a strip of frames from the worst episode of the first policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_io import atomic_write
from .plots import CV, GT, MODEL, Color, new_figure, rgb, save_png
from .report import Block, to_html, to_markdown

PLOTS_DIR = "plots"
COLORS: dict[str, Color] = {"expert": GT, "hold": CV}
BAR_SIZE, HIST_SIZE = (640, 400), (720, 400)


def _color(name: str) -> Color:
    return COLORS.get(name, MODEL)


def success_figure(summary: dict[str, Any]) -> Any:
    figure = new_figure(BAR_SIZE)
    ax = figure.add_subplot()
    names = list(summary["policies"])
    rates = [summary["policies"][n]["success_rate"] * 100 for n in names]
    lows = [max(0.0, rate - summary["policies"][n]["success_ci95"][0] * 100) for n, rate in zip(names, rates,
                                                                                                strict=True)]
    highs = [max(0.0, summary["policies"][n]["success_ci95"][1] * 100 - rate) for n, rate in zip(names, rates,
                                                                                                 strict=True)]
    x = np.arange(len(names))
    ax.bar(x, rates, color=[rgb(_color(n)) for n in names], yerr=[lows, highs], capsize=6)
    ax.set_xticks(x, [f"{n}\n({summary['policies'][n]['episodes']} ep.)" for n in names])
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate (%)")
    ax.set_title("Closed-loop success (bars: Wilson 95 % interval)")
    ax.grid(axis="y", color="0.9")
    figure.tight_layout()
    return figure


def length_figure(records: Sequence[dict[str, Any]], names: Sequence[str]) -> Any:
    figure = new_figure(HIST_SIZE)
    ax = figure.add_subplot()
    lengths = {n: [r["steps"] for r in records if r["policy"] == n] for n in names}
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = np.linspace(0, top + 1, min(30, top + 2)).tolist()
    for name, values in lengths.items():
        ax.hist(values, bins=bins, color=rgb(_color(name), 0.55), label=name, edgecolor=rgb(_color(name)))
    ax.set_xlabel("episode length (steps)")
    ax.set_ylabel("episodes")
    ax.set_title("Episode length (a success ends the episode; failures run to the limit)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return figure


def strip_figure(frames: np.ndarray, title: str, steps: int) -> Any:
    count = len(frames)
    figure = new_figure((160 * count, 220))
    for k, frame in enumerate(frames):
        ax = figure.add_subplot(1, count, k + 1)
        ax.imshow(frame)
        ax.set_axis_off()
        ax.set_title(f"{k + 1}/{count}", fontsize=8)
    figure.suptitle(f"{title} ({steps} steps; frames evenly spaced over the step limit)", fontsize=9)
    return figure


def _rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, s in summary["policies"].items():
        ci, lat = s["success_ci95"], s["plan_ms"]
        rows.append([name, s["episodes"], f"{100 * s['success_rate']:.1f} %",
                     f"{100 * ci[0]:.1f} .. {100 * ci[1]:.1f} %", s["mean_steps"], s["mean_time_to_success_s"],
                     s["collisions_per_episode"], s["knocked_off"], s["mean_final_distance_m"], s["errors"],
                     lat["p50"], lat["p90"], lat["p99"], s["forwards_per_plan"]])
    return rows


def write_closed_loop_report(summary: dict[str, Any], records: Sequence[dict[str, Any]], out: Path) -> Path:
    """``out/report.html``, ``out/report.md`` and ``out/plots/*.png``; returns the HTML path."""
    from .robot_closed_loop import FRAMES_DIR

    header = summary["header"]
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    title = f"Closed loop: {header['task']} ({header.get('model') or 'baselines only'})"
    blocks: list[Block] = [("h1", title),
                           ("p", f"Seeds {header['seeds'][0]}..{header['seeds'][1] - 1} (held-out from "
                                 f"{header['held_out_start']}); a plan runs {header['execute'] or 'all'} of its "
                                 f"rows before the next; step limit {header['max_steps'] or 'the task own'}."),
                           ("table", ["policy", "episodes", "success", "95 % CI", "mean steps", "time to success s",
                                      "collisions/ep.", "knocked off", "final dist. m", "errored", "plan p50 ms",
                                      "p90 ms", "p99 ms", "forwards/plan"], _rows(summary))]
    if summary["policies"]:
        save_png(success_figure(summary), plots / "success.png")
        save_png(length_figure(records, list(summary["policies"])), plots / "episode_length.png")
        blocks += [("img", "success per policy", f"{PLOTS_DIR}/success.png"),
                   ("img", "episode length", f"{PLOTS_DIR}/episode_length.png")]
    worst = summary.get("worst")
    strip = out / FRAMES_DIR / f"{worst['policy']}-{worst['seed']}.npz" if worst else None
    if worst and strip is not None and strip.is_file():
        record = next(r for r in records if r["policy"] == worst["policy"] and r["seed"] == worst["seed"])
        with np.load(strip) as data:
            frames = data["frames"]
        outcome = "succeeded" if record["success"] else "failed"
        save_png(strip_figure(frames, f"worst episode: {worst['policy']} seed {worst['seed']}, {outcome}",
                              record["steps"]), plots / "worst_episode.png")
        blocks += [("h2", "Worst episode"), ("img", "worst episode frames", f"{PLOTS_DIR}/worst_episode.png")]
    failures = [r for r in records if r["error"]][:20]
    if failures:
        blocks += [("h2", "Errored episodes"),
                   ("table", ["policy", "seed", "error"], [[r["policy"], r["seed"], r["error"]] for r in failures])]
    atomic_write(out / "report.md", to_markdown(blocks))
    atomic_write(out / "report.html", to_html(blocks, title))
    return out / "report.html"
