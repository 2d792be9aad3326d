"""Report figures drawn with matplotlib: latency histogram, L2 per horizon, bird's-eye overlays of worst cases.

Every PNG is written atomically (:func:`~blockpilot.atomic_io.atomic_open`). Sizes are fixed in
pixels (:data:`LATENCY_SIZE`, :data:`L2_SIZE`, :data:`BEV_SIZE`) so reports lay out predictably.
matplotlib (the ``eval`` extra) is imported when a figure is drawn, not when this module is, and
only its object-oriented API is used (a ``Figure`` on an Agg canvas), so no global pyplot state or
display backend is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic_io import atomic_open
from .summary import HORIZONS_S, hkey, num, percentiles_and_mean, total_ms

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LATENCY_SIZE = (800, 400)
L2_SIZE = (800, 420)
BEV_VIEW_PX = 640
BEV_SIZE = (BEV_VIEW_PX, BEV_VIEW_PX + 116)
BEV_WORST = 6
DPI = 100
EGO_LENGTH_M, EGO_WIDTH_M = 4.084, 1.85
# WOD-E2E trust region (fallback when blockpilot.eval.metrics.trust_regions is unusable)
_TRUST_LAT_M = {3.0: 1.0, 5.0: 1.8}
_TRUST_LNG_FACTOR = 4.0

Color = tuple[int, int, int]
INK: Color = (30, 30, 30)
MODEL: Color = (214, 39, 40)
CV: Color = (255, 140, 0)
GT: Color = (44, 160, 44)
RATER: Color = (148, 103, 189)
AGENT: dict[str, Color] = {"vehicle": (31, 119, 180), "pedestrian": (227, 119, 194), "cyclist": (23, 190, 207)}
AGENT_OTHER: Color = (127, 127, 127)
PCT_COLORS: dict[str, Color] = {"p50": GT, "p90": CV, "p99": MODEL}


def rgb(color: Color, alpha: float = 1.0) -> tuple[float, float, float, float]:
    """A 0-255 colour as matplotlib's 0-1 RGBA."""
    return color[0] / 255, color[1] / 255, color[2] / 255, alpha


def new_figure(size: tuple[int, int]) -> Figure:
    """A figure of exactly ``size`` pixels on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` atomically, at its exact pixel size."""
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=DPI)
    return path


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def latency_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """Histogram of the total milliseconds per plan, with p50, p90 and p99 marked."""
    totals = [v for r in records if (v := total_ms(r)) is not None]
    figure = new_figure(LATENCY_SIZE)
    ax = figure.add_subplot()
    ax.set_title(f"Planning latency, total ms per plan ({len(totals)} plans)")
    ax.set_xlabel("total ms per plan")
    ax.set_ylabel("plans")
    if not totals:
        ax.text(0.5, 0.5, "no latency data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return figure
    arr = np.asarray(totals)
    lo, hi = float(arr.min()), float(arr.max())
    pad = max(0.05 * (hi - lo), 0.5)
    bins = int(np.clip(np.sqrt(arr.size) * 2, 5, 40))
    ax.hist(arr, bins=bins, range=(max(0.0, lo - pad), hi + pad), color="0.6", edgecolor="0.43")
    for name, value in percentiles_and_mean(totals).items():
        if name in PCT_COLORS and value is not None:
            ax.axvline(value, color=rgb(PCT_COLORS[name]), linewidth=2, label=f"{name} {value:.2f} ms")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", color="0.9")
    figure.tight_layout()
    return figure


def l2_figure(summary: dict[str, Any]) -> Figure:
    """Bars of mean L2 (m), model against constant velocity, for both conventions at 1, 2 and 3 s."""
    labels: list[str] = []
    values: dict[str, list[float | None]] = {"model": [], "cv": []}
    for conv, label in (("stp3_vad", "avg to {}s"), ("uniad", "at {}s")):
        for t in HORIZONS_S:
            labels.append(label.format(f"{t:g}"))
            for pred in values:
                values[pred].append(summary[pred]["l2"][conv][hkey(t)])
    figure = new_figure(L2_SIZE)
    ax = figure.add_subplot()
    ax.set_title("L2 (m) on full-future samples: model vs constant velocity")
    x = np.arange(len(labels), dtype=np.float64)
    for k, (pred, name, color) in enumerate((("model", "model", MODEL), ("cv", "constant velocity", CV))):
        heights = [v or 0.0 for v in values[pred]]
        bars = ax.bar(x - 0.18 + 0.36 * k, heights, width=0.34, color=rgb(color), label=name)
        ax.bar_label(bars, labels=[_fmt(v) for v in values[pred]], padding=2, fontsize=8)
    top = max([v for vs in values.values() for v in vs if v is not None] + [1e-3])
    ax.set_ylim(0.0, top * 1.25)
    ax.set_xticks(x, labels)
    ax.set_ylabel("L2 (m)")
    ax.axvline(len(HORIZONS_S) - 0.5, color=rgb(INK), linewidth=0.8)
    ax.set_xlabel("ST-P3/VAD: average up to t" + " " * 40 + "UniAD: at t")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", color="0.9")
    figure.tight_layout()
    return figure


def latency_histogram(records: Sequence[dict[str, Any]], path: Path) -> Path:
    return save_png(latency_figure(records), path)


def l2_by_horizon(summary: dict[str, Any], path: Path) -> Path:
    return save_png(l2_figure(summary), path)


# ----------------------------------------------------------------------------- bird's-eye view


def _points(value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return np.zeros((0, 2))
    return arr[np.isfinite(arr).all(axis=1)]


def _box_corners(x: float, y: float, yaw: float, length: float, width: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    local = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * [length / 2, width / 2]
    return np.array([x, y]) + local @ np.array([[c, s], [-s, c]])


def _trust_boxes(record: dict[str, Any]) -> list[tuple[float, np.ndarray]]:
    """(horizon, corners) of each rater's trust region at 3 s and 5 s."""
    raters = [(_points(r.get("xy")), float(r.get("score") or 0.0)) for r in record.get("raters") or []]
    raters = [(xy, s) for xy, s in raters if len(xy)]
    speed = num(record.get("speed_mps")) or 0.0
    if not raters:
        return []
    try:
        from .metrics import trust_regions

        return [(tr.horizon_s, _box_corners(*tr.centre, tr.heading_rad, 2 * tr.half_lng_m, 2 * tr.half_lat_m))
                for tr in trust_regions(raters, speed)]
    except (ImportError, TypeError, ValueError, AttributeError):
        pass
    k = float(np.clip(0.5 + 0.5 * (speed - 1.4) / 9.6, 0.5, 1.0))
    out = []
    for xy, _ in raters:
        for h, lat in _TRUST_LAT_M.items():
            i = round(h * 4) - 1
            if i >= len(xy):
                continue
            step = xy[i] - (xy[i - 1] if i else np.zeros(2))
            yaw = math.atan2(step[1], step[0]) if np.hypot(*step) > 1e-9 else 0.0
            out.append((h, _box_corners(xy[i, 0], xy[i, 1], yaw, 2 * _TRUST_LNG_FACTOR * lat * k, 2 * lat * k)))
    return out


def manoeuvre_text(record: dict[str, Any]) -> str:
    """The model's chosen manoeuvre (``lateral / longitudinal``, or ``n/a`` when it did not parse)."""
    behaviour = ((record.get("predictions") or {}).get("model") or {}).get("behaviour")
    if not isinstance(behaviour, dict) or not behaviour:
        return "n/a"
    return " / ".join(str(v) for v in behaviour.values())


def bev_title(record: dict[str, Any]) -> str:
    """Sample, route command and the model's manoeuvre: the first thing a reader of a BEV plot needs."""
    return (f"{record.get('sample_id')}: route {record.get('route_command') or 'n/a'}, "
            f"model chose {manoeuvre_text(record)}")


def _plot_xy(ax: Axes, xy: np.ndarray, **style: Any) -> None:
    """A trajectory from the ego origin, in the view's axes (y left -> horizontal, x forward -> up)."""
    if len(xy):
        line = np.concatenate([np.zeros((1, 2)), xy])
        ax.plot(line[:, 1], line[:, 0], marker="o", markevery=slice(1, None), **style)


def _outline(ax: Axes, corners: np.ndarray, **style: Any) -> None:
    from matplotlib.patches import Polygon

    ax.add_patch(Polygon(corners[:, ::-1], closed=True, **style))


def bev_figure(record: dict[str, Any]) -> Figure:
    """Top-down view (x forward pointing up, y left pointing left) of one sample: agents, the ground
    truth, the model's and the constant-velocity plan, raters and their trust regions. The title
    names the route command and the model's manoeuvre; the legend sits below the view, where no box
    can cover it."""
    gt = record.get("gt") or {}
    valid = np.asarray(gt.get("valid") or [], dtype=bool)
    gt_xy = _points(gt.get("xy"))
    gt_xy = gt_xy[valid[: len(gt_xy)]] if len(valid) == len(gt_xy) else gt_xy
    preds = record.get("predictions") or {}
    model_xy, cv_xy = _points((preds.get("model") or {}).get("xy")), _points((preds.get("cv") or {}).get("xy"))
    raters = [(_points(r.get("xy")), num(r.get("score"))) for r in record.get("raters") or []]
    trust = _trust_boxes(record)
    pts = np.concatenate([np.zeros((1, 2)), gt_xy, model_xy, cv_xy, *[xy for xy, _ in raters],
                          *[c for _, c in trust]])
    lo, hi = pts.min(axis=0) - 6.0, pts.max(axis=0) + 6.0
    side = float(max(hi[0] - lo[0], hi[1] - lo[1], 20.0))
    centre = (lo + hi) / 2

    figure = new_figure(BEV_SIZE)
    height = 0.87 * BEV_VIEW_PX / BEV_SIZE[1]  # the view, with room above for the title
    ax = figure.add_axes((0.08, 0.92 - height, 0.9, height))  # room for a title wrapped on two lines
    ax.set_xlim(centre[1] + side / 2, centre[1] - side / 2)  # y left points left
    ax.set_ylim(centre[0] - side / 2, centre[0] + side / 2)
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(bev_title(record), fontsize=10, wrap=True)  # a long sample id wraps, never clips
    ax.set_xlabel("y left (m)", fontsize=8, labelpad=1)
    ax.set_ylabel("x forward (m)", fontsize=8, labelpad=1)
    ax.tick_params(labelsize=7)
    ax.grid(color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)

    agents = record.get("agents") or {}
    steps = list(zip(agents.get("times_s") or [], agents.get("boxes") or [], strict=False))
    kinds = agents.get("kinds") or []
    for i in reversed(range(len(steps))):
        alpha = 1.0 - 0.8 * i / max(len(steps) - 1, 1)
        for j, box in enumerate(steps[i][1]):
            if len(box) != 5 or not all(math.isfinite(float(v)) for v in box):
                continue
            kind = kinds[i][j] if i < len(kinds) and j < len(kinds[i]) else "agent"
            _outline(ax, _box_corners(*map(float, box)), fill=False,
                     edgecolor=rgb(AGENT.get(kind, AGENT_OTHER), alpha), linewidth=1.5 if i == 0 else 0.8)
    _outline(ax, _box_corners(0.0, 0.0, 0.0, EGO_LENGTH_M, EGO_WIDTH_M), facecolor="0.24", edgecolor=rgb(INK))
    for h, corners in trust:
        _outline(ax, corners, fill=False, edgecolor=rgb(RATER, 0.45 if h < 4 else 0.8), linewidth=0.8)
    for xy, score in raters:
        _plot_xy(ax, xy, color=rgb(RATER, 0.7), linewidth=1, markersize=3)
        if len(xy) and score is not None:
            ax.annotate(f"{score:g}", (xy[-1, 1], xy[-1, 0]), color=rgb(RATER), fontsize=7)
    for xy, color, width in ((gt_xy, GT, 2.5), (cv_xy, CV, 1.8), (model_xy, MODEL, 2.5)):
        _plot_xy(ax, xy, color=rgb(color), linewidth=width, markersize=4)

    from matplotlib.patches import Patch

    items: list[tuple[str, Color]] = [("ground truth", GT), ("model", MODEL), ("constant velocity", CV)]
    present = {k for row in kinds for k in row} if kinds else ({"agent"} if steps else set())
    items += [(f"{kind} (fades with time)", AGENT.get(kind, AGENT_OTHER)) for kind in sorted(present)][:3]
    if raters:
        items.append(("raters + trust regions 3/5 s", RATER))
    metrics = record.get("metrics") or {}
    l2 = {p: _l2_at(metrics.get(p), 3.0) for p in ("model", "cv")}
    figure.legend(handles=[Patch(color=rgb(c), label=name) for name, c in items], loc="lower left",
                  bbox_to_anchor=(0.01, 0.075), ncols=3, fontsize=8, frameon=False, borderaxespad=0.0,
                  handlelength=1.2, columnspacing=1.2)
    caption = (f"status {record.get('status')}   L2@3s model {_fmt(l2['model'])} m, cv {_fmt(l2['cv'])} m"
               f"   axes in metres, ego box at the origin")
    figure.text(0.015, 0.045, caption, fontsize=8)
    if record.get("error"):
        figure.text(0.015, 0.012, str(record["error"])[:110], fontsize=8, color=rgb(MODEL))
    return figure


def bev_overlay(record: dict[str, Any], path: Path) -> Path:
    return save_png(bev_figure(record), path)


def _l2_at(metric: Any, t: float) -> float | None:
    if not isinstance(metric, dict):
        return None
    for time, l2, ok in zip(metric.get("times_s") or [], metric.get("l2") or [], metric.get("valid") or [],
                            strict=False):
        if abs(float(time) - t) <= 1e-3 and ok:
            return num(l2)
    return None


def write_plots(records: Sequence[dict[str, Any]], summary: dict[str, Any], plots_dir: Path,
                worst: int = BEV_WORST) -> dict[str, Any]:
    """All report figures into ``plots_dir``; stale ``bev_<n>.png`` from an earlier run are removed.
    Returns ``{"latency": path, "l2_by_horizon": path, "bev": [(sample_id, path), ..]}``."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    by_id = {str(r.get("sample_id")): r for r in records}
    bev: list[tuple[str, Path]] = []
    for row in summary["worst_cases"]:
        record = by_id.get(row["sample_id"])
        if record is None or record.get("status") == "parse_error" or len(bev) >= worst:
            continue
        bev.append((row["sample_id"], bev_overlay(record, plots_dir / f"bev_{len(bev) + 1}.png")))
    keep = {p.name for _, p in bev}
    for stale in plots_dir.glob("bev_*.png"):
        if stale.name not in keep:
            stale.unlink()
    return {"latency": latency_histogram(records, plots_dir / "latency.png"),
            "l2_by_horizon": l2_by_horizon(summary, plots_dir / "l2_by_horizon.png"), "bev": bev}
