"""Per-sample planning metrics (pure numpy functions; aggregation lives with the caller).

Conventions shared by every function here:

* Positions are metres in the sample's evaluation frame: x forward, y left, origin at the ego at t0.
  A trajectory is a ``(T, 2)`` array of positions at increasing future times; it never holds the
  t = 0 point, which is always the origin and is prepended where a rule needs it.
* Agent boxes at one step are ``(M, 5)`` rows ``x, y, yaw, length, width``: centre, heading
  (radians, counter-clockwise from +x), extent along the heading and across it.
* ST-P3 / VAD / UniAD collision: pixel for pixel the scripts' procedure, see
  :mod:`blockpilot.eval.stp3_grid` (0.5 m image over +-50 m, agents drawn as OpenCV's ``fillPoly``
  draws them, the unrotated 4.084 x 1.85 m footprint template moved by truncation and clamped onto
  the border); checked identical to OpenCV / scikit-image running that procedure on 42,000 random steps.
* BEV-Planner collision: a 0.1 m grid over [-50, 50) m on both axes; cell ``(i, j)`` has its centre
  at ``(-50 + 0.1 (i + 0.5), -50 + 0.1 (j + 0.5))`` and belongs to a rectangle when its centre lies
  inside it (boundary included, 1e-9 m of slack). The footprint is re-rasterised at every step,
  turned to the step's heading and centred ``box_offset_m`` ahead of the waypoint along it (see
  :func:`trajectory_headings`); a step collides when a footprint cell inside the grid lies in an
  agent box of that step. This follows the variant's definition (0.1 m, turned box, any hit up to
  t), not one script's pixel rules: BEV-Planner's script rotates a rasterised template and works in
  the IMU frame, putting the box 0.5 + 0.985793 m ahead; callers pass the offset that fits their frame
  (``EvalSample.ego_box_offset_m``).
* WOD-E2E Rater Feedback Score: see :func:`rater_feedback_score`; rater and predicted trajectories
  are at 4 Hz from 0.25 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import stp3_grid
from .types import BoolArray, FloatArray, RatedTrajectory

IntArray = npt.NDArray[np.int64]
RaterLike = RatedTrajectory | tuple[npt.ArrayLike, float]

EGO_LENGTH_M = 4.084
EGO_WIDTH_M = 1.85
STP3_RESOLUTION_M = 0.5
BEV_PLANNER_RESOLUTION_M = 0.1
GRID_HALF_EXTENT_M = 50.0
BEV_PLANNER_MIN_STEP_M = 1.0
_INSIDE_EPS = 1e-9

RFS_HORIZONS_S = (3.0, 5.0)
RFS_BASE_LAT_THRESHOLDS_M = (1.0, 1.8)
RFS_LNG_MULTIPLIER = 4.0
RFS_DECAY = 0.1
RFS_MIN_SCORE_OUTSIDE = 4.0
RFS_NUM_RATERS = 3


def _xy(value: npt.ArrayLike, what: str) -> FloatArray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected shape (T, 2), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: holds a non-finite value")
    return arr


# ----------------------------------------------------------------------------- displacement


def l2_errors(pred: npt.ArrayLike, gt: npt.ArrayLike) -> FloatArray:
    """Euclidean distance between ``pred`` and ``gt`` at every step, shape ``(T,)``."""
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"l2_errors: shapes {p.shape} and {g.shape} differ or are not (T, D)")
    return np.asarray(np.linalg.norm(p - g, axis=1), dtype=np.float64)


def common_steps(pred_times: npt.ArrayLike, gt_times: npt.ArrayLike, tol: float = 1e-6) -> tuple[IntArray, IntArray]:
    """Indices into ``pred_times`` and ``gt_times`` of the times both hold (within ``tol``), in time order."""
    pt, gt = np.asarray(pred_times, dtype=np.float64), np.asarray(gt_times, dtype=np.float64)
    pi: list[int] = []
    gi: list[int] = []
    used = np.zeros(gt.shape, dtype=bool)
    for i in np.argsort(pt, kind="stable"):
        hits = np.flatnonzero((np.abs(gt - pt[i]) <= tol) & ~used)
        if hits.size:
            pi.append(int(i))
            gi.append(int(hits[0]))
            used[hits[0]] = True
    return np.array(pi, dtype=np.int64), np.array(gi, dtype=np.int64)


def resample_trajectory(xy: npt.ArrayLike, times_s: npt.ArrayLike, new_times_s: npt.ArrayLike) -> FloatArray:
    """Linear interpolation per axis through the origin at t = 0 and ``xy`` at ``times_s``."""
    pts = _xy(xy, "resample_trajectory.xy")
    t = np.asarray(times_s, dtype=np.float64)
    new = np.asarray(new_times_s, dtype=np.float64)
    if t.shape != (len(pts),) or not len(t) or t[0] <= 0 or np.any(np.diff(t) <= 0):
        raise ValueError(f"resample_trajectory: times must be {len(pts)} increasing positive values, got {t.tolist()}")
    if new.ndim != 1 or np.any(new <= 0) or np.any(new > t[-1] + 1e-9):
        raise ValueError(f"resample_trajectory: new times must lie in (0, {t[-1]:g}] s, got {new.tolist()}")
    tt = np.concatenate([[0.0], t])
    x = np.interp(new, tt, np.concatenate([[0.0], pts[:, 0]]))
    y = np.interp(new, tt, np.concatenate([[0.0], pts[:, 1]]))
    return np.stack([x, y], axis=1)


def ade_fde(errors: npt.ArrayLike, times_s: npt.ArrayLike, horizon_s: float,
            tol: float = 1e-6) -> tuple[float, float] | None:
    """Mean error over the times <= ``horizon_s`` and the error at ``horizon_s``; ``None`` without that time."""
    err, t = np.asarray(errors, dtype=np.float64), np.asarray(times_s, dtype=np.float64)
    if err.shape != t.shape or err.ndim != 1:
        raise ValueError(f"ade_fde: errors {err.shape} and times {t.shape} must be equal 1-D shapes")
    at = np.flatnonzero(np.abs(t - horizon_s) <= tol)
    if not at.size:
        return None
    return float(err[t <= horizon_s + tol].mean()), float(err[at[0]])


def percentiles(values: npt.ArrayLike, qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": .., "p90": .., "p99": ..}`` (numpy's linear method); ``{}`` for no values."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not arr.size:
        return {}
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(arr, list(qs)), strict=True)}


# ----------------------------------------------------------------------------- collisions


def _inside_any_box(px: FloatArray, py: FloatArray, boxes: npt.ArrayLike) -> BoolArray:
    """Per point: does it lie inside (boundary included) any of the ``(M, 5)`` boxes?"""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    if not len(b) or not px.size:
        return np.zeros(px.shape, dtype=bool)
    dx, dy = px[:, None] - b[None, :, 0], py[:, None] - b[None, :, 1]
    c, s = np.cos(b[:, 2]), np.sin(b[:, 2])
    along, across = dx * c + dy * s, -dx * s + dy * c
    inside = (np.abs(along) <= b[:, 3] / 2 + _INSIDE_EPS) & (np.abs(across) <= b[:, 4] / 2 + _INSIDE_EPS)
    return np.asarray(inside.any(axis=1), dtype=bool)


def _centres(idx: IntArray, res: float) -> FloatArray:
    return np.asarray(-GRID_HALF_EXTENT_M + res * (idx + 0.5), dtype=np.float64)


def _rect_cells(cx: float, cy: float, yaw: float, length: float, width: float, res: float) -> IntArray:
    """Cells ``(K, 2)`` whose centres lie in the rectangle; indices may fall outside the grid."""
    c, s = abs(np.cos(yaw)), abs(np.sin(yaw))
    ex, ey = c * length / 2 + s * width / 2, s * length / 2 + c * width / 2
    lo = np.floor((np.array([cx - ex, cy - ey]) + GRID_HALF_EXTENT_M) / res - 0.5).astype(np.int64) - 1
    hi = np.ceil((np.array([cx + ex, cy + ey]) + GRID_HALF_EXTENT_M) / res - 0.5).astype(np.int64) + 1
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    cells = np.stack([ii.ravel(), jj.ravel()], axis=1)
    keep = _inside_any_box(_centres(cells[:, 0], res), _centres(cells[:, 1], res),
                           np.array([[cx, cy, yaw, length, width]]))
    return np.asarray(cells[keep], dtype=np.int64)


def _footprint_hits(cells: IntArray, res: float, boxes: npt.ArrayLike) -> bool:
    n = round(2 * GRID_HALF_EXTENT_M / res)
    cells = cells[np.all((cells >= 0) & (cells < n), axis=1)]
    return bool(_inside_any_box(_centres(cells[:, 0], res), _centres(cells[:, 1], res), boxes).any())


def _check_boxes(traj: FloatArray, boxes: Sequence[npt.ArrayLike], what: str) -> None:
    if len(boxes) != len(traj):
        raise ValueError(f"{what}: {len(traj)} waypoints but {len(boxes)} box arrays")


def stp3_ego_template(box_offset_m: float = 0.5) -> IntArray:
    """ST-P3 footprint template ``(K, 2)``: (row index along the box's length, column index across it),
    counting 0.5 m cells from -49.75 m (see :mod:`blockpilot.eval.stp3_grid`)."""
    rows, cols = stp3_grid.ego_template(box_offset_m)
    return np.stack([rows, cols], axis=1)


def collisions_stp3(traj: npt.ArrayLike, boxes: Sequence[npt.ArrayLike], *, box_offset_m: float = 0.5) -> BoolArray:
    """ST-P3 / VAD / UniAD box collision per step, shape ``(T,)``, pixel for pixel as their scripts
    compute it (:mod:`blockpilot.eval.stp3_grid`): the unrotated footprint template moved to the
    waypoint meets a pixel OpenCV would draw for one of ``boxes[t]``."""
    pts = _xy(traj, "collisions_stp3.traj")
    _check_boxes(pts, boxes, "collisions_stp3")
    return stp3_grid.collisions(pts, boxes, box_offset_m)


def trajectory_headings(traj: npt.ArrayLike, *, min_step_m: float = BEV_PLANNER_MIN_STEP_M) -> FloatArray:
    """BEV-Planner heading per waypoint: the direction of the displacement from the previous point
    (the origin before the first), or 0 (facing +x) where that displacement is under ``min_step_m``."""
    pts = _xy(traj, "trajectory_headings.traj")
    d = np.diff(np.concatenate([np.zeros((1, 2)), pts]), axis=0)
    heading = np.arctan2(d[:, 1], d[:, 0])
    heading[np.linalg.norm(d, axis=1) < min_step_m] = 0.0
    return np.asarray(heading, dtype=np.float64)


def bev_planner_footprint(position: npt.ArrayLike, heading: float, *, box_offset_m: float = 0.5) -> IntArray:
    """0.1 m cells ``(K, 2)`` of the ego box turned to ``heading`` and centred ahead of ``position``."""
    px, py = np.asarray(position, dtype=np.float64)
    cx, cy = px + box_offset_m * np.cos(heading), py + box_offset_m * np.sin(heading)
    return _rect_cells(float(cx), float(cy), heading, EGO_LENGTH_M, EGO_WIDTH_M, BEV_PLANNER_RESOLUTION_M)


def collisions_bev_planner(traj: npt.ArrayLike, boxes: Sequence[npt.ArrayLike], *,
                           box_offset_m: float = 0.5) -> BoolArray:
    """BEV-Planner box collision per step, shape ``(T,)``: the heading-turned ego footprint on the
    0.1 m grid meets a cell whose centre lies in one of ``boxes[t]``."""
    pts = _xy(traj, "collisions_bev_planner.traj")
    _check_boxes(pts, boxes, "collisions_bev_planner")
    heads = trajectory_headings(pts)
    return np.array([_footprint_hits(bev_planner_footprint(pts[t], float(heads[t]), box_offset_m=box_offset_m),
                                     BEV_PLANNER_RESOLUTION_M, boxes[t]) for t in range(len(pts))], dtype=bool)


# ----------------------------------------------------------------------------- WOD-E2E rater feedback score


@dataclass(frozen=True)
class RfsResult:
    """One prediction's Rater Feedback Score; ``per_horizon`` holds the best rater's score at each
    horizon before the outside-trust-region floor."""

    score: float
    per_horizon: dict[float, float]
    within_trust_region: bool
    horizons_s: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "per_horizon": {f"{h:g}": v for h, v in self.per_horizon.items()},
                "in_trust_region": self.within_trust_region}


@dataclass(frozen=True)
class TrustRegion:
    """A rater's trust region at one horizon: a rectangle centred on the rater's point, turned to its
    longitudinal direction, extending ``half_lng_m`` along and ``half_lat_m`` across it."""

    rater: int
    horizon_s: float
    centre: tuple[float, float]
    heading_rad: float
    half_lng_m: float
    half_lat_m: float


def rfs_horizons(length_s: float) -> tuple[float, ...]:
    """The scored horizons: 3 s and 5 s where <= ``length_s``, ending with ``length_s`` itself."""
    hs = [h for h in RFS_HORIZONS_S if h <= length_s]
    if not hs or hs[-1] != length_s:
        hs.append(float(length_s))
    return tuple(hs)


def rfs_speed_scale(init_speed_mps: float) -> float:
    """Threshold scale: 0.5 up to 1.4 m/s, rising linearly to 1.0 at 11 m/s."""
    return float(np.clip(0.5 + 0.5 * (init_speed_mps - 1.4) / (11.0 - 1.4), 0.5, 1.0))


def rfs_thresholds(horizons_s: Sequence[float], init_speed_mps: float) -> tuple[FloatArray, FloatArray]:
    """Lateral and longitudinal thresholds (m) at each horizon, speed scale included."""
    lat = np.interp(np.asarray(horizons_s, dtype=np.float64), RFS_HORIZONS_S, RFS_BASE_LAT_THRESHOLDS_M)
    lat = lat * rfs_speed_scale(init_speed_mps)
    return lat, lat * RFS_LNG_MULTIPLIER


def rater_directions(xy: npt.ArrayLike) -> FloatArray:
    """Unit longitudinal direction ``(n, 2)`` of a rater trajectory at each step: its displacement
    from the previous point (origin first); a zero one keeps the previous direction, (1, 0) at first."""
    pts = _xy(xy, "rater_directions.xy")
    d = np.diff(np.concatenate([np.zeros((1, 2)), pts]), axis=0)
    out = np.empty_like(d)
    prev = np.array([1.0, 0.0])
    for s in range(len(d)):
        norm = float(np.hypot(d[s, 0], d[s, 1]))
        if norm > 0.0:
            prev = d[s] / norm
        out[s] = prev
    return out


def _length_s(n_points: int, frequency_hz: int, length_s: float | None) -> tuple[float, int]:
    length = n_points / frequency_hz if length_s is None else float(length_s)
    if length <= 0 or not float(length).is_integer():
        raise ValueError(f"rater_feedback_score: length_s must be a positive whole number of seconds, got {length:g}")
    return length, int(length) * frequency_hz


def _prepare_raters(raters: Sequence[RaterLike], n_points: int) -> list[tuple[FloatArray, float]]:
    """The first three raters (the last repeated if fewer), each cut or padded to ``n_points``."""
    if not len(raters):
        raise ValueError("rater_feedback_score: no rater trajectories")
    out: list[tuple[FloatArray, float]] = []
    for k, r in enumerate(raters[:RFS_NUM_RATERS]):
        xy, score = (r.xy, r.score) if isinstance(r, RatedTrajectory) else r
        pts = _xy(xy, f"rater {k}")
        if not len(pts) or not np.isfinite(score):
            raise ValueError(f"rater {k}: needs at least one point and a finite score, got {len(pts)} points, {score}")
        pts = pts[:n_points]
        pts = np.concatenate([pts, np.repeat(pts[-1:], n_points - len(pts), axis=0)])
        out.append((pts, float(score)))
    return out + [out[-1]] * (RFS_NUM_RATERS - len(out))


def rater_feedback_score(pred: npt.ArrayLike, raters: Sequence[RaterLike], init_speed_mps: float, *,
                         frequency_hz: int = 4, length_s: float | None = None) -> RfsResult:
    """WOD-E2E Rater Feedback Score of one prediction (positions at ``frequency_hz`` from 1/f s).

    At each horizon H (step ``H * f - 1``) and for each rater, the prediction's offset from the
    rater's point is split along the rater's longitudinal and lateral directions and divided by the
    thresholds; the larger ratio ``r`` gives ``score * 0.1 ** max(r - 1, 0)``. The best rater per
    horizon is averaged over horizons; unless one rater has ``r <= 1`` at every horizon, the result
    is raised to at least 4.
    """
    p = _xy(pred, "rater_feedback_score.pred")
    if not np.isfinite(init_speed_mps):
        raise ValueError(f"rater_feedback_score: init speed must be finite, got {init_speed_mps}")
    length, n_points = _length_s(len(p), frequency_hz, length_s)
    if len(p) < n_points:
        raise ValueError(f"rater_feedback_score: pred has {len(p)} points, {length:g} s needs {n_points}")
    rated = _prepare_raters(raters, n_points)
    horizons = rfs_horizons(length)
    lat_thr, lng_thr = rfs_thresholds(horizons, init_speed_mps)
    steps = [round(h * frequency_hz) - 1 for h in horizons]
    ratio = np.empty((len(rated), len(horizons)))
    for k, (xy, _) in enumerate(rated):
        lng_dir = rater_directions(xy)[steps]
        lat_dir = np.stack([-lng_dir[:, 1], lng_dir[:, 0]], axis=1)
        off = p[steps] - xy[steps]
        lng = np.abs(np.sum(off * lng_dir, axis=1))
        lat = np.abs(np.sum(off * lat_dir, axis=1))
        ratio[k] = np.maximum(lng / lng_thr, lat / lat_thr)
    scores = np.array([s for _, s in rated])[:, None] * RFS_DECAY ** np.maximum(ratio - 1.0, 0.0)
    best = scores.max(axis=0)
    within = bool(np.any(np.all(ratio <= 1.0, axis=1)))
    score = float(best.mean())
    if not within:
        score = max(RFS_MIN_SCORE_OUTSIDE, score)
    return RfsResult(score=score, per_horizon={h: float(v) for h, v in zip(horizons, best, strict=True)},
                     within_trust_region=within, horizons_s=horizons)


def trust_regions(raters: Sequence[RaterLike], init_speed_mps: float, *, frequency_hz: int = 4,
                  length_s: float = 5.0) -> list[TrustRegion]:
    """The trust regions (for plots) of the raters that count, at every scored horizon."""
    length, n_points = _length_s(0, frequency_hz, length_s)
    rated = _prepare_raters(raters, n_points)[: min(len(raters), RFS_NUM_RATERS)]
    horizons = rfs_horizons(length)
    lat_thr, lng_thr = rfs_thresholds(horizons, init_speed_mps)
    out = []
    for k, (xy, _) in enumerate(rated):
        dirs = rater_directions(xy)
        for h, lat, lng in zip(horizons, lat_thr, lng_thr, strict=True):
            s = round(h * frequency_hz) - 1
            out.append(TrustRegion(rater=k, horizon_s=h, centre=(float(xy[s, 0]), float(xy[s, 1])),
                                   heading_rad=float(np.arctan2(dirs[s, 1], dirs[s, 0])),
                                   half_lng_m=float(lng), half_lat_m=float(lat)))
    return out
