"""The closed-loop driving report: ``report.md`` (every policy's scores side by side) and a bird's-eye strip of the
first policy's worst episodes (``plots/worst_bev.png``), drawn from the trajectories the run keeps
(``trajectories/<policy>-<seed>.npz``: the ego (T, 5), the agents (T, A, 5), the take-over step) over the lanes of the
regenerated scene. matplotlib (the ``eval`` extra) is imported only to draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_io import atomic_open, atomic_write
from ..sim.drive.episode import DriveLog
from ..sim.generator import generate_scene
from .plots import AGENT, AGENT_OTHER, INK, MODEL, new_figure, rgb, save_png

TRAJECTORIES_DIR, REPORT_FILE, BEV_FILE = "trajectories", "report.md", "worst_bev.png"
PANEL_PX = 420
COLUMNS = (("PDMS", "pdms"), ("NC", "nc"), ("DAC", "dac"), ("DDC", "ddc"), ("EP", "ep"), ("TTC", "ttc"),
           ("C", "comfort"), ("RC", "route_completion"), ("DS", "driving_score"))


def trajectory_path(out: Path, policy: str, seed: int) -> Path:
    return out / TRAJECTORIES_DIR / f"{policy}-{seed}.npz"


def save_trajectory(out: Path, policy: str, seed: int, log: DriveLog) -> None:
    path = trajectory_path(out, policy, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, ego=log.ego, agents=log.agents, start_step=np.array(log.start_step))


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report_markdown(summary: dict[str, Any]) -> str:
    h = summary["header"]
    lines = ["# Closed-loop driving", "",
             f"Seeds {h['seeds'][0]}..{h['seeds'][1] - 1} (held out from {h['held_out_start']}); model "
             f"{h['model'] or '(baselines only)'}, backend {h['backend'] or '-'}. Episodes run "
             f"{h['config']['start_s']}..{h['config']['end_s']} s, planning every {h['config']['plan_period_s']} s.",
             "PDMS: NAVSIM v1.1 = NC x DAC x DDC x (5 EP + 5 TTC + 2 C) / 12; RC, DS: Bench2Drive / CARLA leaderboard.",
             "", "| policy | episodes | " + " | ".join(c for c, _ in COLUMNS)
             + " | success (95 % CI) | infractions/km | plan ms p50 | overhead/plan |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|"]
    for name, s in summary["policies"].items():
        ci = s["success_ci95"] or [0.0, 0.0]
        success = f"{100 * (s['success_rate'] or 0):.0f} % ({100 * ci[0]:.0f}..{100 * ci[1]:.0f})"
        lines.append(f"| {name} | {s['episodes']} | " + " | ".join(_cell(s[k]) for _, k in COLUMNS)
                     + f" | {success} | {_cell(s['infractions_per_km'])} | {_cell(s['plan_ms']['p50'])} | "
                       f"{_cell(s['overhead_vs_plan'])} |")
    lines += ["", "Infractions (all episodes): " + "; ".join(
        f"{name}: " + (", ".join(f"{k} {n}" for k, n in s["infractions"].items() if n) or "none")
        for name, s in summary["policies"].items())]
    if summary["worst"]:
        worst = ", ".join(f"{w['policy']} seed {w['seed']} (PDMS {w['pdms']:.2f})" for w in summary["worst"])
        lines += ["", f"Worst episodes: {worst}.", "", f"![worst episodes](plots/{BEV_FILE})"]
    return "\n".join(lines) + "\n"


def _panel(ax: Any, seed: int, data: Any, title: str) -> None:
    road = generate_scene(seed).road
    for lane in road.lanes or (road.centerline,):
        ax.plot(lane[:, 0], lane[:, 1], color="0.85", linewidth=6, solid_capstyle="butt", zorder=0)
    ego, agents, k0 = data["ego"], data["agents"], int(data["start_step"])
    kinds = [a.kind for a in generate_scene(seed).agents]
    for a in range(agents.shape[1]):
        color = AGENT.get(kinds[a] if a < len(kinds) else "", AGENT_OTHER)
        ax.plot(agents[k0:, a, 0], agents[k0:, a, 1], color=rgb(color), linewidth=1.2)
    ax.plot(ego[:k0 + 1, 0], ego[:k0 + 1, 1], color="0.5", linewidth=1.5, linestyle=":")
    ax.plot(ego[k0:, 0], ego[k0:, 1], color=rgb(MODEL), linewidth=2.0)
    ax.scatter([ego[-1, 0]], [ego[-1, 1]], color=rgb(MODEL), s=18, zorder=3)
    lo, hi = ego[:, :2].min(axis=0) - 25, ego[:, :2].max(axis=0) + 25
    span = float((hi - lo).max())
    mid = (lo + hi) / 2
    ax.set_xlim(mid[0] - span / 2, mid[0] + span / 2)
    ax.set_ylim(mid[1] - span / 2, mid[1] + span / 2)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9, color=rgb(INK))
    ax.tick_params(labelsize=7)


def write_drive_report(summary: dict[str, Any], records: Sequence[dict[str, Any]], out: Path) -> Path:
    """``report.md`` and, when trajectories are there, ``plots/worst_bev.png``; returns the report's path."""
    worst = [w for w in summary["worst"] if trajectory_path(out, w["policy"], w["seed"]).is_file()]
    if worst:
        figure = new_figure((PANEL_PX * len(worst), PANEL_PX + 20))
        by_id = {(r["policy"], r["seed"]): r for r in records if r["status"] == "ok"}
        for k, w in enumerate(worst):
            ax = figure.add_subplot(1, len(worst), k + 1)
            record = by_id.get((w["policy"], w["seed"]))
            what = "" if record is None else (f", {record['route_command']}, RC "
                                              f"{record['driving']['route_completion']:.2f}")
            with np.load(trajectory_path(out, w["policy"], w["seed"])) as data:
                _panel(ax, int(w["seed"]), data, f"{w['policy']} seed {w['seed']}: PDMS {w['pdms']:.2f}{what}")
        figure.tight_layout()
        (out / "plots").mkdir(parents=True, exist_ok=True)
        save_png(figure, out / "plots" / BEV_FILE)
    path = out / REPORT_FILE
    atomic_write(path, report_markdown(summary))
    return path
