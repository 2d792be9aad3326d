"""The ST-P3 / VAD / UniAD box-collision check, pixel for pixel as their evaluation scripts compute it.

Those scripts work on a 200 x 200 image of 0.5 m pixels over +-50 m around the t0 origin, with
pixel centres at whole image coordinates. In our forward/left axes a point (f, l) sits at column
``u = 100 - 2 l`` and row ``v = 100 - 2 f`` (their lidar x points right and y forward; the image
flips y). This module reproduces, without OpenCV or scikit-image:

* **Agents** are drawn the way OpenCV's ``fillPoly`` draws a polygon whose corners were rounded to
  whole pixels (numpy's round-half-to-even): on every row from the top corner down to, but not
  including, the bottom one, the pixels whose centres lie between the left and right edges, the
  edges stepped down the rows in 16.16 fixed point; plus every pixel of the 8-connected line
  (Bresenham, drawn left to right) along each edge.
* **The ego footprint** is a fixed set of template cells: the rows whose centres lie within the
  unrotated 4.084 m box (centred ``box_offset_m`` ahead of the trajectory point; boundary included)
  and the columns within its 1.85 m width, 8 x 4 = 32 cells for the scripts' 0.5 m offset. At a
  waypoint the template moves by the waypoint in pixels (computed in float32, as the scripts' torch
  tensors are), the sums are truncated toward zero, and indices off the image are clamped onto its
  border, as the scripts do.
* A step collides when any footprint pixel is drawn by an agent of that step.

``tests/test_stp3_opencv_parity.py`` checks this against ``cv2.fillPoly`` (OpenCV 5.0, what the
scripts call) on thousands of random boxes: identical on every box that lies inside the image. Like
OpenCV, an edge line is clipped to the image (integer Cohen-Sutherland) before it is drawn. A box
that crosses the image border (45 m or more from the ego) can still differ from OpenCV by a few
pixels within 8 pixels of the border (about one such box in ten): OpenCV's scan-line fill steps the
edges that start above the image differently. OpenCV's output is the reference by definition there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .types import BoolArray, FloatArray

SIZE = 200
RESOLUTION_M = 0.5
EGO_LENGTH_M = 4.084
EGO_WIDTH_M = 1.85
_SHIFT = 16
_BOUNDARY_EPS = 1e-9


def to_pixels(points: npt.ArrayLike) -> FloatArray:
    """(column u, row v) image coordinates of forward/left points ``(N, 2)``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.stack([100.0 - p[:, 1] / RESOLUTION_M, 100.0 - p[:, 0] / RESOLUTION_M], axis=1)


def box_corners(box: npt.ArrayLike) -> FloatArray:
    """The four corners ``(4, 2)`` (forward/left) of a box ``x, y, yaw, length, width``."""
    x, y, yaw, length, width = (float(v) for v in np.asarray(box, dtype=np.float64).ravel())
    along, across = np.array([math.cos(yaw), math.sin(yaw)]), np.array([-math.sin(yaw), math.cos(yaw)])
    signs = ((1, 1), (-1, 1), (-1, -1), (1, -1))
    return np.array([[x, y] + a * length / 2 * along + b * width / 2 * across for a, b in signs])


def line_pixels(u0: int, v0: int, u1: int, v1: int) -> list[tuple[int, int]]:
    """(row, column) pixels of OpenCV's 8-connected line from (u0, v0) to (u1, v1), drawn left to right."""
    if u1 < u0:
        u0, v0, u1, v1 = u1, v1, u0, v0
    du, dv = u1 - u0, abs(v1 - v0)
    step_v = -1 if v1 < v0 else 1
    steep = dv > du
    major, minor = (dv, du) if steep else (du, dv)
    err = major - 2 * minor
    u, v, out = u0, v0, []
    for _ in range(major + 1):
        out.append((v, u))
        diagonal = err < 0
        err += -2 * minor + (2 * major if diagonal else 0)
        if steep:
            v += step_v
            u += 1 if diagonal else 0
        else:
            u += 1
            v += step_v if diagonal else 0
    return out


def clip_line(u0: int, v0: int, u1: int, v1: int) -> tuple[int, int, int, int] | None:
    """The part of a segment inside the image, ends moved onto its border with integer arithmetic
    truncated toward zero as OpenCV's ``clipLine`` does; None when the segment misses the image."""
    last = SIZE - 1

    def outside(u: int, v: int) -> int:  # bits: left 1, right 2, above 4, below 8
        return (u < 0) | (u > last) << 1 | (v < 0) << 2 | (v > last) << 3

    c0, c1 = outside(u0, v0), outside(u1, v1)
    if c0 & c1:
        return None
    if c0 & 12:
        row = 0 if c0 & 4 else last
        u0, v0 = u0 + _trunc_div((row - v0) * (u1 - u0), v1 - v0), row
        c0 = outside(u0, v0) & 3
    if c1 & 12:
        row = 0 if c1 & 4 else last
        u1, v1 = u1 + _trunc_div((row - v1) * (u1 - u0), v1 - v0), row
        c1 = outside(u1, v1) & 3
    if c0 & c1:
        return None
    if c0:
        col = 0 if c0 & 1 else last
        u0, v0 = col, v0 + _trunc_div((col - u0) * (v1 - v0), u1 - u0)
    if c1:
        col = 0 if c1 & 1 else last
        u1, v1 = col, v1 + _trunc_div((col - u1) * (v1 - v0), u1 - u0)
    return u0, v0, u1, v1


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def polygon_pixels(corners_uv: npt.ArrayLike) -> set[tuple[int, int]]:
    """(row, column) pixels OpenCV's ``fillPoly`` sets for a polygon with whole-pixel corners; the fill
    is not clipped, so rows and columns off the image may appear (callers drop them)."""
    pts = [(int(u), int(v)) for u, v in np.asarray(corners_uv).reshape(-1, 2)]
    pixels: set[tuple[int, int]] = set()
    edges = []
    for (u0, v0), (u1, v1) in zip(pts[-1:] + pts[:-1], pts, strict=True):
        clipped = clip_line(u0, v0, u1, v1)
        if clipped is not None:
            pixels.update(line_pixels(*clipped))
        if v0 == v1:
            continue
        top_u, top_v, bottom_v = (u0, v0, v1) if v0 < v1 else (u1, v1, v0)
        edges.append((top_v, bottom_v, top_u << _SHIFT, _trunc_div((u1 - u0) << _SHIFT, v1 - v0)))
    if len(edges) < 2:
        return pixels
    for v in range(min(e[0] for e in edges), max(e[1] for e in edges)):
        xs = sorted(x + (v - v_top) * dx for v_top, v_bottom, x, dx in edges if v_top <= v < v_bottom)
        for left, right in zip(xs[0::2], xs[1::2], strict=False):
            first, last = (left + (1 << _SHIFT) - 1) >> _SHIFT, right >> _SHIFT
            pixels.update((v, u) for u in range(first, last + 1))
    return pixels


def ego_template(box_offset_m: float = 0.5) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(rows along the box's length, columns across it) of the footprint template, as index arrays
    of the 32 (or so) cells; indices count 0.5 m cells from -49.75 m."""
    def span(lo_m: float, hi_m: float) -> npt.NDArray[np.int64]:
        lo, hi = (lo_m + 49.75) / RESOLUTION_M, (hi_m + 49.75) / RESOLUTION_M
        return np.arange(math.ceil(lo - _BOUNDARY_EPS), math.floor(hi + _BOUNDARY_EPS) + 1, dtype=np.int64)

    rows = span(box_offset_m - EGO_LENGTH_M / 2, box_offset_m + EGO_LENGTH_M / 2)
    cols = span(-EGO_WIDTH_M / 2, EGO_WIDTH_M / 2)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return rr.ravel(), cc.ravel()


def ego_pixels(point: npt.ArrayLike, template: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
               ) -> set[tuple[int, int]]:
    """(row, column) image pixels of the footprint at a forward/left waypoint (truncated, clamped)."""
    f, left = (np.float32(v) / np.float32(RESOLUTION_M) for v in np.asarray(point, dtype=np.float64))
    rows = np.clip(np.trunc(SIZE - (float(f) + template[0])).astype(np.int64), 0, SIZE - 1)
    cols = np.clip(np.trunc(-float(left) + template[1]).astype(np.int64), 0, SIZE - 1)
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


def collisions(traj: FloatArray, boxes: Sequence[npt.ArrayLike], box_offset_m: float = 0.5) -> BoolArray:
    """Per step: does the footprint at ``traj[t]`` meet a pixel drawn by one of ``boxes[t]``?"""
    template = ego_template(box_offset_m)
    hits = np.zeros(len(traj), dtype=bool)
    for t, point in enumerate(traj):
        ego = ego_pixels(point, template)
        rows, cols = [p[0] for p in ego], [p[1] for p in ego]
        for box in np.asarray(boxes[t], dtype=np.float64).reshape(-1, 5):
            uv = np.rint(to_pixels(box_corners(box))).astype(np.int64)
            # a box whose drawn pixels cannot reach the footprint's rectangle is skipped undrawn
            if (uv[:, 0].max() < min(cols) or uv[:, 0].min() > max(cols) or uv[:, 1].max() < min(rows)
                    or uv[:, 1].min() > max(rows)):
                continue
            if ego & polygon_pixels(uv):
                hits[t] = True
                break
    return hits
