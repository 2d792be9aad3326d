"""The closed-loop driving report, in the replay report's look (:mod:`.report`'s blocks, rendered as ``report.html``
and ``report.md``): every policy's scores side by side, the paired differences of a ``--compare-bundle`` run, the
sub-score bars and score distributions (:mod:`.drive_plots`), a per-episode table and a bird's-eye strip of the
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
from .drive_compare import PAIRED_SCORES
from .drive_plots import write_drive_plots
from .plots import AGENT, AGENT_OTHER, INK, MODEL, new_figure, rgb, save_png
from .report import Block, to_html, to_markdown

TRAJECTORIES_DIR, REPORT_FILE, HTML_FILE, BEV_FILE = "trajectories", "report.md", "report.html", "worst_bev.png"
TITLE = "Closed-loop driving"
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}"


def _three(value: float | None, sign: str = "") -> str:
    return "n/a" if value is None else f"{value:{sign}.3f}"


def report_blocks(summary: dict[str, Any], records: Sequence[dict[str, Any]],
                  plots: dict[str, Path]) -> list[Block]:
    """The report's content as the replay report's blocks (:func:`~blockpilot.eval.report.to_html`)."""
    h = summary["header"]
    compare = h.get("compare")
    blocks: list[Block] = [
        ("h1", TITLE),
        ("p", f"Seeds {h['seeds'][0]}..{h['seeds'][1] - 1} (held out from {h['held_out_start']}); "
              + (f"model {h['model']}, backend {h['backend']}" if h["model"] else
                 f"policies {', '.join(summary['policies'])}")
              + (f"; compare {compare['model']}, backend {compare['backend']}" if compare else "")
              + f". Episodes run {h['config']['start_s']}..{h['config']['end_s']} s, planning every "
                f"{h['config']['plan_period_s']} s."),
        ("p", "PDMS: NAVSIM v1.1 = NC x DAC x DDC x (5 EP + 5 TTC + 2 C) / 12; RC, DS: Bench2Drive / CARLA "
              "leaderboard. A failed episode scores 0."),
        ("h2", "Policies"),
        ("table", ["policy", "episodes", *(c for c, _ in COLUMNS), "success % (95 % CI)", "infractions/km",
                   "plan ms p50", "overhead/plan", "failed"],
         [[name, s["episodes"], *(s[k] for _, k in COLUMNS),
           f"{_pct(s['success_rate'])} ({_pct((s['success_ci95'] or [None])[0])}.."
           f"{_pct((s['success_ci95'] or [None, None])[1])})",
           s["infractions_per_km"], s["plan_ms"]["p50"], s["overhead_vs_plan"], s["failed"]]
          for name, s in summary["policies"].items()]),
        ("p", "Infractions (all episodes): " + "; ".join(
            f"{name}: " + (", ".join(f"{k} {n}" for k, n in s["infractions"].items() if n) or "none")
            for name, s in summary["policies"].items()))]
    paired = summary.get("paired")
    if paired:
        blocks += [("h2", f"Paired: {paired['candidate']} - {paired['reference']}"),
                   ("table", ["score", "episodes", paired["reference"], paired["candidate"], "mean difference",
                              "95 % CI low", "95 % CI high", "sd"],
                    [[name, paired["episodes"], *(_three(v) for v in (p["reference_mean"], p["candidate_mean"])),
                      *(_three(v, "+") for v in (p["mean_diff"], *(p["ci95"] or [None, None]))), _three(p["sd_diff"])]
                     for name, p in ((k, paired[k]) for k, _, _ in PAIRED_SCORES)]),
                   ("p", "Per seed, the candidate's score minus the reference's; the interval is a percentile "
                         "bootstrap of the mean over the seeds (negative: the candidate drove worse).")]
    blocks += [("img", "sub-scores per policy", f"plots/{plots['subscores'].name}"),
               ("img", "PDMS and driving score per episode", f"plots/{plots['distribution'].name}")]
    if summary["worst"]:
        worst = ", ".join(f"{w['policy']} seed {w['seed']} (PDMS {w['pdms']:.2f})" for w in summary["worst"])
        blocks += [("h2", "Worst episodes"), ("p", f"{worst}.")]
        if "bev" in plots:
            blocks.append(("img", "worst episodes, bird's-eye view", f"plots/{plots['bev'].name}"))
    rows = [[r["policy"], r["seed"], r["status"], r.get("layout"), r.get("route_command"),
             *((r["pdm"][k] if k in r["pdm"] else r["driving"][k]) if r["status"] == "ok" else None
               for _, k in COLUMNS),
             r["driving"]["success"] if r["status"] == "ok" else False, len(r.get("collisions") or []),
             r.get("plans"), r.get("error")] for r in records]
    blocks += [("h2", f"Episodes ({len(records)})"),
               ("table", ["policy", "seed", "status", "layout", "command", *(c for c, _ in COLUMNS), "success",
                          "collisions", "plans", "error"], rows)]
    return blocks


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
    """``report.html`` and ``report.md`` (the same content), ``plots/subscores.png``,
    ``plots/score_distribution.png`` and, when trajectories are there, ``plots/worst_bev.png``; every file written
    atomically. Returns the HTML report's path."""
    plots = write_drive_plots(summary, records, out / "plots")
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
        plots["bev"] = save_png(figure, out / "plots" / BEV_FILE)
    blocks = report_blocks(summary, records, plots)
    atomic_write(out / REPORT_FILE, to_markdown(blocks))
    path = out / HTML_FILE
    atomic_write(path, to_html(blocks, TITLE))
    return path
