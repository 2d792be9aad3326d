"""Report figures drawn with Pillow: latency histogram, L2 per horizon, bird's-eye overlays of worst cases.

Every PNG is written atomically (:func:`~blockpilot.atomic_io.atomic_open`). Sizes are
fixed (:data:`LATENCY_SIZE`, :data:`L2_SIZE`, :data:`BEV_SIZE`) so reports lay out predictably.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic_io import atomic_open
from .summary import HORIZONS_S, hkey, num, percentiles_and_mean, total_ms

LATENCY_SIZE = (800, 400)
L2_SIZE = (800, 420)
BEV_VIEW_PX = 640
BEV_SIZE = (BEV_VIEW_PX, BEV_VIEW_PX + 116)
BEV_WORST = 6
EGO_LENGTH_M, EGO_WIDTH_M = 4.084, 1.85
# WOD-E2E trust region (fallback when blockpilot.eval.metrics.trust_regions is unusable)
_TRUST_LAT_M = {3.0: 1.0, 5.0: 1.8}
_TRUST_LNG_FACTOR = 4.0

Color = tuple[int, int, int]
BG: Color = (255, 255, 255)
INK: Color = (30, 30, 30)
GRID: Color = (228, 228, 228)
GRID_MAJOR: Color = (200, 200, 200)
MODEL: Color = (214, 39, 40)
CV: Color = (255, 140, 0)
GT: Color = (44, 160, 44)
RATER: Color = (148, 103, 189)
AGENT: dict[str, Color] = {"vehicle": (31, 119, 180), "pedestrian": (227, 119, 194), "cyclist": (23, 190, 207)}
AGENT_OTHER: Color = (127, 127, 127)
PCT_COLORS: dict[str, Color] = {"p50": GT, "p90": CV, "p99": MODEL}


def _font(size: int | None = None) -> Any:
    return ImageFont.load_default() if size is None else ImageFont.load_default(size=size)


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return path


def nice_step(span: float, target: int = 5) -> float:
    """A 1/2/5 x 10^k step that cuts ``span`` into about ``target`` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    base = 10 ** math.floor(math.log10(raw))
    return next((m * base for m in (1, 2, 5, 10) if m * base >= raw), 10 * base)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _text_center(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: Color, font: Any) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2 - top), text, fill=fill, font=font)


class _Axes:
    """A plotting rectangle with linear x and y mappings, ticks and labels."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int],
                 xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
        self.draw, self.box, self.xlim, self.ylim = draw, box, xlim, ylim

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        fx = (x - self.xlim[0]) / ((self.xlim[1] - self.xlim[0]) or 1.0)
        fy = (y - self.ylim[0]) / ((self.ylim[1] - self.ylim[0]) or 1.0)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    def frame(self, xlabel: str, ylabel: str, xticks: bool = True) -> None:
        d, font = self.draw, _font()
        left, top, right, bottom = self.box
        step = nice_step(self.ylim[1] - self.ylim[0])
        for k in range(math.floor(self.ylim[1] / step) + 1):
            y = k * step
            if y < self.ylim[0]:
                continue
            _, py = self.px(self.xlim[0], y)
            d.line([(left, py), (right, py)], fill=GRID)
            d.text((left - 6, py), f"{y:g}", fill=INK, font=font, anchor="rm")
        if xticks:
            step = nice_step(self.xlim[1] - self.xlim[0], 8)
            for k in range(math.ceil(self.xlim[0] / step), math.floor(self.xlim[1] / step) + 1):
                px, _ = self.px(k * step, self.ylim[0])
                d.line([(px, bottom), (px, bottom + 4)], fill=INK)
                d.text((px, bottom + 6), f"{k * step:g}", fill=INK, font=font, anchor="mt")
        d.rectangle(self.box, outline=INK)
        d.text(((left + right) / 2, bottom + 24), xlabel, fill=INK, font=font, anchor="mt")
        d.text((left - 40, top - 16), ylabel, fill=INK, font=font)


def latency_histogram(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Histogram of the total milliseconds per plan, with p50, p90 and p99 marked."""
    totals = [v for r in records if (v := total_ms(r)) is not None]
    image = Image.new("RGB", LATENCY_SIZE, BG)
    d = ImageDraw.Draw(image)
    d.text((LATENCY_SIZE[0] / 2, 14), f"Planning latency, total ms per plan ({len(totals)} plans)", fill=INK,
           font=_font(14), anchor="mt")
    if not totals:
        _text_center(d, (LATENCY_SIZE[0] / 2, LATENCY_SIZE[1] / 2), "no latency data", INK, _font(14))
        return save_png(image, path)
    arr = np.asarray(totals)
    lo, hi = float(arr.min()), float(arr.max())
    pad = max(0.05 * (hi - lo), 0.5)
    lo, hi = max(0.0, lo - pad), hi + pad
    counts, edges = np.histogram(arr, bins=int(np.clip(np.sqrt(arr.size) * 2, 5, 40)), range=(lo, hi))
    ax = _Axes(d, (70, 60, LATENCY_SIZE[0] - 30, LATENCY_SIZE[1] - 60), (lo, hi), (0.0, float(counts.max()) * 1.15))
    ax.frame("total ms per plan", "plans")
    for c, e0, e1 in zip(counts, edges[:-1], edges[1:], strict=True):
        if c:
            x0, y0 = ax.px(float(e0), float(c))
            x1, y1 = ax.px(float(e1), 0.0)
            d.rectangle((x0 + 1, y0, max(x0 + 1, x1 - 1), y1), fill=(150, 150, 150), outline=(110, 110, 110))
    pct = percentiles_and_mean(totals)
    for i, (name, color) in enumerate(PCT_COLORS.items()):
        value = pct[name]
        if value is None:
            continue
        x, _ = ax.px(value, 0.0)
        d.line([(x, ax.box[1]), (x, ax.box[3])], fill=color, width=2)
        right = x > ax.box[2] - 120  # label left of the line near the right edge
        d.text((x - 4 if right else x + 4, ax.box[1] + 4 + 14 * i), f"{name} {value:.2f} ms", fill=color,
               font=_font(), anchor="ra" if right else "la")
    return save_png(image, path)


def l2_by_horizon(summary: dict[str, Any], path: Path) -> Path:
    """Bars of mean L2 (m), model against constant velocity, for both conventions at 1, 2 and 3 s."""
    image = Image.new("RGB", L2_SIZE, BG)
    d = ImageDraw.Draw(image)
    d.text((L2_SIZE[0] / 2, 12), "L2 (m) on full-future samples: model vs constant velocity", fill=INK,
           font=_font(14), anchor="mt")
    groups: list[tuple[str, dict[str, float | None]]] = []
    for conv, label in (("stp3_vad", "avg to {}s"), ("uniad", "at {}s")):
        for t in HORIZONS_S:
            groups.append((label.format(f"{t:g}"), {p: summary[p]["l2"][conv][hkey(t)]
                                                     for p in ("model", "cv")}))
    top = max([v for _, vals in groups for v in vals.values() if v is not None] + [1e-3])
    ax = _Axes(d, (70, 60, L2_SIZE[0] - 30, L2_SIZE[1] - 80), (0.0, float(len(groups))), (0.0, top * 1.2))
    ax.frame("", "L2 (m)", xticks=False)
    font = _font()
    for g, (label, vals) in enumerate(groups):
        for k, (pred, color) in enumerate((("model", MODEL), ("cv", CV))):
            x0, _ = ax.px(g + 0.15 + 0.35 * k, 0.0)
            x1, y0 = ax.px(g + 0.15 + 0.35 * (k + 1) - 0.02, vals[pred] or 0.0)
            if vals[pred] is not None:
                d.rectangle((x0, y0, x1, ax.box[3]), fill=color)
            d.text(((x0 + x1) / 2, y0 - 3), _fmt(vals[pred]), fill=INK, font=font, anchor="mb")
        cx, _ = ax.px(g + 0.5, 0.0)
        d.text((cx, ax.box[3] + 6), label, fill=INK, font=font, anchor="mt")
    mid, _ = ax.px(len(HORIZONS_S), 0.0)
    d.line([(mid, ax.box[1]), (mid, ax.box[3] + 30)], fill=INK)
    for x, text in ((ax.px(1.5, 0)[0], "ST-P3/VAD: average up to t"), (ax.px(4.5, 0)[0], "UniAD: at t")):
        d.text((x, ax.box[3] + 24), text, fill=INK, font=font, anchor="mt")
    _legend(d, [("model", MODEL), ("constant velocity", CV)], (ax.box[0] + 10, ax.box[1] + 8))
    return save_png(image, path)


def _legend(d: ImageDraw.ImageDraw, items: Sequence[tuple[str, Color]], origin: tuple[float, float],
            max_x: float = 1e9) -> None:
    """Colour swatches with names in a row, wrapping to a next row of 16 px past ``max_x``."""
    x, y = origin
    font = _font()
    for name, color in items:
        width = 34 + d.textlength(name, font=font)
        if x + width > max_x and x > origin[0]:
            x, y = origin[0], y + 16
        d.rectangle((x, y + 2, x + 18, y + 10), fill=color)
        d.text((x + 24, y), name, fill=INK, font=font)
        x += width


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


def _fade(color: Color, alpha: float) -> Color:
    r, g, b = (round(bg + (c - bg) * alpha) for c, bg in zip(color, BG, strict=True))
    return r, g, b


def bev_overlay(record: dict[str, Any], path: Path) -> Path:
    """Top-down view (x forward pointing up, y left pointing left) of one sample: agents, the ground
    truth, the model's and the constant-velocity plan, raters and their trust regions."""
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
    scale = BEV_VIEW_PX / side

    def px(p: Sequence[float] | np.ndarray) -> tuple[float, float]:
        return (BEV_VIEW_PX / 2 - (p[1] - centre[1]) * scale, BEV_VIEW_PX / 2 - (p[0] - centre[0]) * scale)

    image = Image.new("RGB", BEV_SIZE, BG)
    d = ImageDraw.Draw(image)
    font = _font()
    grid = next(g for g in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 1e9) if g * scale >= 12)
    for axis in (0, 1):
        first = math.ceil((centre[axis] - side / 2) / grid)
        for k in range(first, math.floor((centre[axis] + side / 2) / grid) + 1):
            m = k * grid
            major = k % 5 == 0
            a = px((m, centre[1] + side / 2) if axis == 0 else (centre[0] + side / 2, m))
            b = px((m, centre[1] - side / 2) if axis == 0 else (centre[0] - side / 2, m))
            d.line([a, b], fill=GRID_MAJOR if major else GRID)
            if major:
                d.text((a[0] + 2, a[1] + 1) if axis == 0 else (a[0] + 2, a[1] + 2), f"{m:g}", fill=(150, 150, 150),
                       font=font)
    agents = record.get("agents") or {}
    steps = list(zip(agents.get("times_s") or [], agents.get("boxes") or [], strict=False))
    kinds = agents.get("kinds") or []
    for i in reversed(range(len(steps))):
        alpha = 1.0 - 0.8 * i / max(len(steps) - 1, 1)
        for j, box in enumerate(steps[i][1]):
            if len(box) != 5 or not all(math.isfinite(float(v)) for v in box):
                continue
            kind = kinds[i][j] if i < len(kinds) and j < len(kinds[i]) else "agent"
            color = _fade(AGENT.get(kind, AGENT_OTHER), alpha)
            d.polygon([px(c) for c in _box_corners(*map(float, box))], outline=color, width=2 if i == 0 else 1)
    d.polygon([px(c) for c in _box_corners(0.0, 0.0, 0.0, EGO_LENGTH_M, EGO_WIDTH_M)], fill=(60, 60, 60),
              outline=INK)
    for h, corners in trust:
        d.polygon([px(c) for c in corners], outline=_fade(RATER, 0.45 if h < 4 else 0.8), width=1)
    for xy, score in raters:
        _trajectory(d, px, xy, _fade(RATER, 0.7), 1, 2)
        if len(xy) and score is not None:
            d.text(px(xy[-1]), f"{score:g}", fill=RATER, font=font)
    for xy, color, width in ((gt_xy, GT, 3), (cv_xy, CV, 2), (model_xy, MODEL, 3)):
        _trajectory(d, px, xy, color, width, 3)
    d.line([(BEV_VIEW_PX, BEV_VIEW_PX), (0, BEV_VIEW_PX)], fill=INK)
    items = [("ground truth", GT), ("model", MODEL), ("constant velocity", CV)]
    present = {k for row in kinds for k in row} if kinds else ({"agent"} if steps else set())
    items += [(f"{kind} (fades with time)", AGENT.get(kind, AGENT_OTHER)) for kind in sorted(present)][:3]
    if raters:
        items.append(("raters + trust regions 3/5 s", RATER))
    _legend(d, items, (8, BEV_VIEW_PX + 8), max_x=BEV_VIEW_PX - 8)
    metrics = record.get("metrics") or {}
    l2 = {p: _l2_at(metrics.get(p), 3.0) for p in ("model", "cv")}
    caption = (f"{record.get('sample_id')}   status {record.get('status')}   "
               f"L2@3s model {_fmt(l2['model'])} m, cv {_fmt(l2['cv'])} m")
    d.text((8, BEV_VIEW_PX + 44), caption, fill=INK, font=_font(13))
    note = f"grid {grid:g} m, x forward (up), y left (left), ego box at the origin"
    d.text((8, BEV_VIEW_PX + 68), note, fill=INK, font=font)
    if record.get("error"):
        d.text((8, BEV_VIEW_PX + 88), str(record["error"])[:110], fill=MODEL, font=font)
    return save_png(image, path)


def _l2_at(metric: Any, t: float) -> float | None:
    if not isinstance(metric, dict):
        return None
    for time, l2, ok in zip(metric.get("times_s") or [], metric.get("l2") or [], metric.get("valid") or [],
                            strict=False):
        if abs(float(time) - t) <= 1e-3 and ok:
            return num(l2)
    return None


def _trajectory(d: ImageDraw.ImageDraw, px: Any, xy: np.ndarray, color: Color, width: int, dot: int) -> None:
    if not len(xy):
        return
    line = [px((0.0, 0.0))] + [px(p) for p in xy]
    d.line(line, fill=color, width=width, joint="curve")
    for u, v in line[1:]:
        d.ellipse((u - dot, v - dot, u + dot, v + dot), fill=color)


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
