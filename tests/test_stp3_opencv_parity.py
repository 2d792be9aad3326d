"""The ST-P3 rasteriser (numpy, eval/stp3_grid.py) against OpenCV, which the ST-P3 / VAD / UniAD scripts call.

The evaluation scripts draw every agent box with ``cv2.fillPoly`` on a 200 x 200 image after rounding
its corners to whole pixels; these tests draw the same random boxes both ways and compare the pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from blockpilot.eval.stp3_grid import (
    SIZE,
    box_corners,
    clip_line,
    collisions,
    ego_pixels,
    ego_template,
    polygon_pixels,
    to_pixels,
)

Pixels = set[tuple[int, int]]


def opencv_pixels(corners_uv: np.ndarray) -> Pixels:
    image = np.zeros((SIZE, SIZE), dtype=np.uint8)
    cv2.fillPoly(image, [corners_uv.astype(np.int32).reshape(-1, 1, 2)], 1)
    return {(int(r), int(c)) for r, c in np.argwhere(image)}


def numpy_pixels(corners_uv: np.ndarray) -> Pixels:
    return {(r, c) for r, c in polygon_pixels(corners_uv) if 0 <= r < SIZE and 0 <= c < SIZE}


def random_box(rng: np.random.Generator, reach_m: float) -> np.ndarray:
    """x, y, yaw, length, width: from a pedestrian (0.3 m) to a bus (12 m), any heading."""
    x, y = rng.uniform(-reach_m, reach_m, 2)
    return np.array([x, y, rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 12.0), rng.uniform(0.3, 4.0)])


def near(rng: np.random.Generator, point: np.ndarray) -> np.ndarray:
    """A random box centred within a few metres of ``point``."""
    box = random_box(rng, 0.0)
    box[:2] = point + rng.normal(0.0, 3.0, 2)
    return box


def corners_uv(box: np.ndarray) -> np.ndarray:
    return np.rint(to_pixels(box_corners(box))).astype(np.int64)


def test_boxes_inside_the_image_match_fillpoly_pixel_for_pixel() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 3000:
        uv = corners_uv(random_box(rng, 47.0))
        if uv.min() < 0 or uv.max() >= SIZE:
            continue
        ours, reference = numpy_pixels(uv), opencv_pixels(uv)
        assert ours == reference, (uv.tolist(), sorted(ours ^ reference)[:8])
        checked += 1


def test_degenerate_and_axis_aligned_polygons_match_fillpoly() -> None:
    for uv in ([[5, 5], [5, 5], [5, 5], [5, 5]],            # one pixel
               [[3, 7], [12, 7], [12, 7], [3, 7]],          # a horizontal segment
               [[9, 2], [9, 14], [9, 14], [9, 2]],          # a vertical segment
               [[20, 20], [40, 20], [40, 30], [20, 30]],    # axis-aligned rectangle
               [[50, 50], [53, 51], [52, 54], [49, 53]]):   # a small rotated square
        corners = np.array(uv)
        assert numpy_pixels(corners) == opencv_pixels(corners), uv


def test_clip_line_matches_opencv() -> None:
    rng = np.random.default_rng(1)
    for u0, v0, u1, v1 in rng.integers(-60, SIZE + 60, size=(3000, 4)).tolist():
        inside, p0, p1 = cv2.clipLine((0, 0, SIZE, SIZE), (u0, v0), (u1, v1))
        ours = clip_line(u0, v0, u1, v1)
        assert (ours is not None) == inside, (u0, v0, u1, v1)
        if inside:
            assert ours == (*p0, *p1), (u0, v0, u1, v1)


def test_boxes_across_the_border_differ_at_most_near_it() -> None:
    """OpenCV's fill steps edges that start off the image its own way: a box crossing the border may
    differ by a few pixels, all within 8 pixels of the border (45 m and more from the ego)."""
    rng = np.random.default_rng(2)
    crossing = differing = 0
    while crossing < 1500:
        uv = corners_uv(random_box(rng, 56.0))
        if uv.min() >= 0 and uv.max() < SIZE:
            continue
        crossing += 1
        diff = numpy_pixels(uv) ^ opencv_pixels(uv)
        differing += bool(diff)
        assert all(min(r, c, SIZE - 1 - r, SIZE - 1 - c) < 8 for r, c in diff), (uv.tolist(), sorted(diff)[:8])
    assert differing < crossing // 5  # 9 % measured; the rest match exactly


def test_collisions_match_a_fillpoly_occupancy_grid() -> None:
    """The collision check end to end, with OpenCV drawing the agents the way the scripts do."""
    rng = np.random.default_rng(3)
    template = ego_template(0.5)
    hits = 0
    for _ in range(300):
        traj = np.cumsum(rng.uniform([0.0, -1.5], [6.0, 1.5], size=(6, 2)), axis=0)
        boxes = [np.stack([near(rng, point) for _ in range(3)]) for point in traj]
        expected = []
        for point, agents in zip(traj, boxes, strict=True):
            grid = np.zeros((SIZE, SIZE), dtype=np.uint8)
            for agent in agents:
                cv2.fillPoly(grid, [corners_uv(agent).astype(np.int32).reshape(-1, 1, 2)], 1)
            expected.append(any(grid[r, c] for r, c in ego_pixels(point, template)))
        assert collisions(traj, boxes).tolist() == expected
        hits += sum(expected)
    assert 0 < hits < 300 * 6  # the scenes hold both outcomes
