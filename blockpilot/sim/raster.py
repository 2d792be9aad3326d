"""The scene's ground as a top-down class map, and its static props (signs), for the renderer.

Lanes, sidewalks and paint are drawn by splatting points sampled more densely than the map's cells
along each lane (``Path`` arc length by lateral offset), so curves come out without gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from blockpilot.sim.path import Path
from blockpilot.sim.types import FloatArray, Scene

GRASS, SIDEWALK, ROAD, WHITE, YELLOW = range(5)
RESOLUTION = 0.2  # metres per cell
SPLAT = 0.14  # sample spacing, below the cell size
VIEW_MARGIN = 160.0  # map this far around the ego's whole trajectory
SIDEWALK_WIDTH = 2.2
STRIPE = 0.6  # crosswalk bar width and spacing
SIGN_GREY = np.array([120.0, 120.0, 125.0])
STOP_RED = np.array([205.0, 25.0, 30.0])
# Speed-limit boards are colour-coded so that a 112-pixel image can tell them apart.
LIMIT_COLOURS = ((9.0, np.array([240.0, 130.0, 30.0])), (12.0, np.array([235.0, 225.0, 45.0])),
                 (15.0, np.array([60.0, 170.0, 235.0])), (math.inf, np.array([70.0, 205.0, 95.0])))


@dataclass(frozen=True, eq=False)
class Prop:
    """A box standing on the ground (or raised by ``z0``); ``rear`` recolours its back face."""

    xy: tuple[float, float]
    yaw: float
    size: tuple[float, float, float]
    z0: float
    colour: FloatArray
    rear: FloatArray | None = None


@dataclass(frozen=True, eq=False)
class GroundMap:
    origin: FloatArray  # world xy of the corner of cell (0, 0)
    resolution: float
    classes: npt.NDArray[np.uint8]  # (ny, nx)
    props: tuple[Prop, ...]


def _strip(path: Path, d_lo: float, d_hi: float, s_lo: float = 0.0, s_hi: float | None = None) -> FloatArray:
    s = np.arange(s_lo, path.length if s_hi is None else s_hi, SPLAT)
    xy, yaw = path.pose(s)
    normal = np.stack([-np.sin(yaw), np.cos(yaw)], axis=1)
    d = np.linspace(d_lo, d_hi, math.ceil((d_hi - d_lo) / SPLAT) + 1)
    return (xy[:, None, :] + d[None, :, None] * normal[:, None, :]).reshape(-1, 2)


def _parallelogram(corners: FloatArray, stripes: bool) -> FloatArray:
    """Points over the quad c0 + a (c1 - c0) + b (c3 - c0); with ``stripes``, bars along c0 -> c3."""
    across, along = corners[1] - corners[0], corners[3] - corners[0]
    la, lb = float(np.linalg.norm(across)), float(np.linalg.norm(along))
    a = np.arange(0.0, la, SPLAT)
    if stripes:
        a = a[(a // STRIPE).astype(np.int64) % 2 == 0]
    b = np.arange(0.0, lb, SPLAT)
    grid = corners[0] + (a[:, None, None] / la) * across + (b[None, :, None] / lb) * along
    return grid.reshape(-1, 2)


def _outside(points: FloatArray, polygons: tuple[FloatArray, ...]) -> npt.NDArray[np.bool_]:
    keep = np.ones(len(points), dtype=bool)
    for poly in polygons:
        nxt = np.roll(poly, -1, axis=0)
        cross = np.stack([(b[0] - a[0]) * (points[:, 1] - a[1]) - (b[1] - a[1]) * (points[:, 0] - a[0])
                          for a, b in zip(poly, nxt, strict=True)], axis=1)
        keep &= ~((cross >= 0).all(axis=1) | (cross <= 0).all(axis=1))
    return keep


def _limit_colour(limit: float) -> FloatArray:
    return next(colour for bound, colour in LIMIT_COLOURS if limit < bound)


def _sign(ego: Path, s: float, lane_width: float, board: FloatArray) -> tuple[Prop, Prop]:
    xy, yaw = ego.pose(s)
    spot = xy + np.array([np.sin(yaw), -np.cos(yaw)]) * (lane_width / 2 + 1.3)
    where, heading = (float(spot[0]), float(spot[1])), float(yaw)
    return (Prop(where, heading, (0.12, 0.12, 2.0), 0.0, SIGN_GREY),
            Prop(where, heading, (0.08, 0.8, 0.8), 1.9, board))


def build_ground_map(scene: Scene) -> GroundMap:
    road = scene.road
    w = road.lane_width
    lanes = [Path.from_polyline(lane) for lane in (road.lanes or (road.centerline,))]
    ego = Path.from_polyline(road.centerline)
    reach = w / 2 + SIDEWALK_WIDTH + 1.0
    every = np.concatenate([lane.xy for lane in lanes])
    lo = np.maximum(scene.ego.xy.min(axis=0) - VIEW_MARGIN, every.min(axis=0) - reach)
    hi = np.minimum(scene.ego.xy.max(axis=0) + VIEW_MARGIN, every.max(axis=0) + reach)
    nx, ny = (int(v) + 1 for v in np.ceil((hi - lo) / RESOLUTION))
    classes = np.zeros((ny, nx), dtype=np.uint8)

    def paint(points: FloatArray, cls: int) -> None:
        ix = np.floor((points[:, 0] - lo[0]) / RESOLUTION).astype(np.int64)
        iy = np.floor((points[:, 1] - lo[1]) / RESOLUTION).astype(np.int64)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        classes[iy[ok], ix[ok]] = cls

    for lane in lanes:
        paint(_strip(lane, -w / 2 - SIDEWALK_WIDTH, -w / 2), SIDEWALK)
    for lane in lanes:
        paint(_strip(lane, -w / 2, w / 2), ROAD)
    for lane in lanes:
        edge, centre = _strip(lane, -w / 2 + 0.1, -w / 2 + 0.35), _strip(lane, w / 2 - 0.12, w / 2 + 0.12)
        paint(edge[_outside(edge, road.junctions)], WHITE)
        paint(centre[_outside(centre, road.junctions)], YELLOW)
    for walk in road.crosswalks:
        paint(_parallelogram(np.asarray(walk, dtype=np.float64), stripes=True), WHITE)
    props: list[Prop] = []
    if road.stop_line_s is not None:
        paint(_strip(ego, -w / 2, w / 2, road.stop_line_s - 0.25, road.stop_line_s + 0.25), WHITE)
        props += _sign(ego, road.stop_line_s, w, STOP_RED)
    for s, limit in road.speed_limits:
        if s > 0:
            props += _sign(ego, s, w, _limit_colour(limit))
    classes[:2], classes[-2:], classes[:, :2], classes[:, -2:] = GRASS, GRASS, GRASS, GRASS  # see render
    return GroundMap(lo, RESOLUTION, classes, tuple(props))
