"""Map queries for the closed-loop metrics: where on the road a point is, and which way its lane runs.

The drivable area is the union of every lane of the scene's :class:`~blockpilot.sim.types.Road` (its centreline
polyline widened by half the lane width on each side) and the junction polygons; sidewalks and grass are not
drivable. A lane's direction is the order of its polyline's points.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from blockpilot.sim.path import Path
from blockpilot.sim.types import FloatArray, Road

Bools = npt.NDArray[np.bool_]
TOLERANCE_M = 0.05  # a corner this far over the lane edge still counts as on it


def _lane_nearest(polyline: FloatArray, points: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Distance (N,) from each point to the polyline, and the heading (N,) of the nearest segment."""
    a, b = polyline[:-1], polyline[1:]
    d = b - a
    rel = points[:, None, :] - a[None]
    u = np.clip(np.einsum("nkd,kd->nk", rel, d) / np.maximum(np.einsum("kd,kd->k", d, d), 1e-12), 0.0, 1.0)
    dist = np.hypot(*np.moveaxis(rel - u[..., None] * d[None], -1, 0))
    k = np.argmin(dist, axis=1)
    return dist[np.arange(len(points)), k], np.arctan2(d[k, 1], d[k, 0])


def lane_geometry(road: Road, points: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(N, L) distance from each point to every lane's centreline and that lane's heading there."""
    lanes = road.lanes or (road.centerline,)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pairs = [_lane_nearest(np.asarray(lane, dtype=np.float64), pts) for lane in lanes]
    return np.stack([p[0] for p in pairs], axis=1), np.stack([p[1] for p in pairs], axis=1)


def in_junction(road: Road, points: FloatArray) -> Bools:
    """(N,) whether each point lies inside a junction polygon (convex, either winding)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for poly in road.junctions:
        nxt = np.roll(poly, -1, axis=0)
        cross = np.stack([(b[0] - a[0]) * (pts[:, 1] - a[1]) - (b[1] - a[1]) * (pts[:, 0] - a[0])
                          for a, b in zip(poly, nxt, strict=True)], axis=1)
        inside |= (cross >= 0).all(axis=1) | (cross <= 0).all(axis=1)
    return inside


def on_drivable(road: Road, points: FloatArray) -> Bools:
    """(N,) whether each point is on a lane or in a junction."""
    dist, _ = lane_geometry(road, points)
    return np.asarray((dist <= road.lane_width / 2 + TOLERANCE_M).any(axis=1) | in_junction(road, points))


def in_oncoming_lane(road: Road, points: FloatArray, yaw: FloatArray) -> Bools:
    """(N,) whether each point (heading ``yaw``) is in a lane running against it and in none running with it,
    outside junctions."""
    dist, heading = lane_geometry(road, points)
    inside = dist <= road.lane_width / 2
    along = np.cos(heading - np.asarray(yaw, dtype=np.float64).reshape(-1, 1))
    against = (inside & (along < 0)).any(axis=1) & ~(inside & (along >= 0)).any(axis=1)
    return np.asarray(against & ~in_junction(road, points))


def route_frenet(route: Path, points: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(arc length, signed left offset) of each point (N, 2) along ``route`` (:meth:`Path.to_frenet`, vectorised)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    idx = np.array([int(np.argmin(np.sum((route.xy - p) ** 2, axis=1))) for p in pts], dtype=np.int64)
    yaw = route.yaw[idx]
    rel = pts - route.xy[idx]
    return (route.s[idx] + rel[:, 0] * np.cos(yaw) + rel[:, 1] * np.sin(yaw),
            -rel[:, 0] * np.sin(yaw) + rel[:, 1] * np.cos(yaw))
