"""A small numpy rasteriser for the synthetic world's cameras.

The ground is a top-down class map of the scene (grass, sidewalk, asphalt, white and yellow paint),
built once per scene and looked up through each ground pixel's ray: pinhole projection of the plane
z = 0. Road users and signs are boxes, shaded per face and painted far to near. Distance fades
everything towards a haze colour. Deterministic: the same scene, step and camera give the same bytes.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from blockpilot.sim.cameras import CameraLike, CameraSpec
from blockpilot.sim.raster import GRASS, ROAD, SIDEWALK, WHITE, YELLOW, GroundMap, Prop, build_ground_map
from blockpilot.sim.types import FloatArray, Scene

Image = npt.NDArray[np.uint8]

PALETTE = np.zeros((5, 3))
PALETTE[[GRASS, SIDEWALK, ROAD, WHITE, YELLOW]] = [[78, 112, 58], [150, 150, 145], [72, 72, 78], [235, 235, 235],
                                                   [225, 190, 60]]
# Per class: colour and the amplitude of its texture.
_LOOK = np.concatenate([PALETTE, np.zeros((5, 1))], axis=1)
_LOOK[:, 3] = 6.0
_LOOK[GRASS, 3], _LOOK[WHITE, 3], _LOOK[YELLOW, 3] = 14.0, 3.0, 3.0
SKY_TOP, SKY_HORIZON = np.array([95.0, 145.0, 215.0]), np.array([190.0, 210.0, 230.0])
HAZE = np.array([180.0, 195.0, 210.0])
FOG_M = 110.0
MAX_RANGE = 250.0
SUN = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
VEHICLE_COLOURS = np.array([[190, 190, 198], [45, 65, 150], [165, 145, 105], [35, 35, 40], [228, 228, 228],
                            [70, 120, 90]], dtype=np.float64)
KIND_COLOURS = {"pedestrian": np.array([235.0, 120.0, 40.0]), "cyclist": np.array([40.0, 185.0, 205.0])}
BRAKE_LIGHT = np.array([240.0, 25.0, 25.0])
# Box faces as corner indices (corners: x then y then z bits) with outward normals in the box frame.
FACES = (((1, 3, 7, 5), (1, 0, 0)), ((0, 4, 6, 2), (-1, 0, 0)), ((2, 6, 7, 3), (0, 1, 0)),
         ((0, 1, 5, 4), (0, -1, 0)), ((4, 5, 7, 6), (0, 0, 1)))
_CACHE_SIZE = 16
_maps: OrderedDict[int, tuple[weakref.ref[Scene], GroundMap]] = OrderedDict()


def ground_map(scene: Scene) -> GroundMap:
    """The scene's class map, cached for the few most recently rendered scenes."""
    key = id(scene)
    hit = _maps.get(key)
    if hit is not None and hit[0]() is scene:
        _maps.move_to_end(key)
        return hit[1]
    gmap = build_ground_map(scene)
    _maps[key] = (weakref.ref(scene), gmap)
    while len(_maps) > _CACHE_SIZE:
        _maps.popitem(last=False)
    return gmap


@dataclass(frozen=True, eq=False)
class _Rays:
    ground: npt.NDArray[np.bool_]  # (H, W) pixels whose ray meets the ground within MAX_RANGE
    offsets: FloatArray  # (G, 2) ground points in the ego frame
    fade: FloatArray  # (G, 1) fog weight of the ground colour
    sky: FloatArray  # (H, W, 3)


def _spec(camera: CameraLike) -> CameraSpec:
    """Any object with the camera fields (the writers' protocol) as a hashable spec."""
    if isinstance(camera, CameraSpec):
        return camera
    return CameraSpec(camera.name, camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy,
                      camera.x, camera.y, camera.z, camera.yaw)


@functools.lru_cache(maxsize=32)
def _rays(cam: CameraSpec) -> _Rays:
    u = (np.arange(cam.width) + 0.5 - cam.cx) / cam.fx
    v = (np.arange(cam.height) + 0.5 - cam.cy) / cam.fy
    uu, vv = np.meshgrid(u, v)
    dirs = np.stack([uu, vv, np.ones_like(uu)], axis=-1) @ cam.optical_to_ego().T  # (H, W, 3) in the ego frame
    down = -dirs[..., 2]
    with np.errstate(divide="ignore"):
        t = np.where(down > 1e-6, cam.z / np.maximum(down, 1e-9), np.inf)
    dist = t * np.linalg.norm(dirs, axis=-1)
    ground = dist < MAX_RANGE
    pts = np.array([cam.x, cam.y]) + dirs[..., :2] * t[..., None]
    elevation = np.clip(np.arctan2(dirs[..., 2], np.hypot(dirs[..., 0], dirs[..., 1])) / 0.6, 0.0, 1.0)[..., None]
    sky = SKY_HORIZON + (SKY_TOP - SKY_HORIZON) * elevation
    sky = np.where(down[..., None] > 0, HAZE, sky)  # ground beyond MAX_RANGE
    return _Rays(ground, pts[ground], np.exp(-dist[ground] / FOG_M)[:, None], sky)


def _noise(ix: npt.NDArray[np.int64], iy: npt.NDArray[np.int64]) -> FloatArray:
    """A fixed, position-bound texture in [-1, 1] so that the ground is not flat colour."""
    h = (ix * 73856093) ^ (iy * 19349663)
    coarse = ((ix // 6) * 83492791) ^ ((iy // 6) * 2654435761)
    return ((h % 255) / 127.0 - 1.0) * 0.5 + ((coarse % 255) / 127.0 - 1.0) * 0.5


def _ground_colour(gmap: GroundMap, world: FloatArray) -> FloatArray:
    """Bilinear blend of the four nearest cells' colours (paint edges stay smooth up close), plus
    texture. Points off the map clamp onto its border, which is always grass."""
    fx = (world[:, 0] - gmap.origin[0]) / gmap.resolution - 0.5
    fy = (world[:, 1] - gmap.origin[1]) / gmap.resolution - 0.5
    ny, nx = gmap.classes.shape
    ix = np.clip(np.floor(fx), 0, nx - 2).astype(np.int64)
    iy = np.clip(np.floor(fy), 0, ny - 2).astype(np.int64)
    wx, wy = np.clip(fx - ix, 0.0, 1.0)[:, None], np.clip(fy - iy, 0.0, 1.0)[:, None]
    flat = gmap.classes.ravel()
    base = iy * nx + ix
    c00, c10, c01, c11 = (_LOOK[flat[base + k]] for k in (0, 1, nx, nx + 1))
    look = (c00 * (1 - wx) + c10 * wx) * (1 - wy) + (c01 * (1 - wx) + c11 * wx) * wy
    return look[:, :3] + look[:, 3:] * _noise(ix, iy)[:, None]


def _fill(img: FloatArray, poly: FloatArray, colour: FloatArray) -> None:
    """Paint a convex polygon given in pixel coordinates (K, 2)."""
    h, w = img.shape[:2]
    x0, y0 = max(math.floor(poly[:, 0].min()), 0), max(math.floor(poly[:, 1].min()), 0)
    x1, y1 = min(math.ceil(poly[:, 0].max()), w), min(math.ceil(poly[:, 1].max()), h)
    if x0 >= x1 or y0 >= y1:
        return
    px, py = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    nxt = np.roll(poly, -1, axis=0)
    area = float(np.sum(poly[:, 0] * nxt[:, 1] - nxt[:, 0] * poly[:, 1]))
    inside = np.ones(px.shape, dtype=bool)
    for a, b in zip(poly, nxt, strict=True):
        cross = (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0])
        inside &= cross * area >= 0
    img[y0:y1, x0:x1][inside] = colour


def _clip_near(poly: FloatArray, near: float = 0.05) -> FloatArray:
    """Sutherland-Hodgman against the plane z = near, in optical coordinates (K, 3)."""
    out = []
    for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if a[2] >= near:
            out.append(a)
        if (a[2] >= near) != (b[2] >= near):
            out.append(a + (b - a) * (near - a[2]) / (b[2] - a[2]))
    return np.array(out) if out else np.zeros((0, 3))


def _boxes(scene: Scene, agent_states: FloatArray, gmap: GroundMap) -> list[Prop]:
    boxes = list(gmap.props)
    for agent, state in zip(scene.agents, agent_states, strict=True):
        x, y, yaw, _, accel = state
        colour = KIND_COLOURS.get(agent.kind, VEHICLE_COLOURS[agent.agent_id % len(VEHICLE_COLOURS)])
        rear = BRAKE_LIGHT if agent.kind == "vehicle" and accel < -1.0 else None
        boxes.append(Prop((float(x), float(y)), float(yaw), agent.size, 0.0, colour, rear))
    return boxes


def render_camera(scene: Scene, step: int, camera: CameraLike) -> Image:
    """The camera's view at ``step`` as an (H, W, 3) uint8 image."""
    if not 0 <= step < scene.num_steps:
        raise ValueError(f"step {step} outside scene {scene.name} (0..{scene.num_steps - 1})")
    agents = np.array([a.track.states[step] for a in scene.agents]).reshape(len(scene.agents), 5)
    return render_state(scene, scene.ego.states[step, :3], agents, camera)


def render_state(scene: Scene, ego_pose: FloatArray, agent_states: FloatArray, camera: CameraLike) -> Image:
    """The camera's view from a live state: the ego at ``ego_pose`` (x, y, yaw) and the scene's agents, in order, at
    ``agent_states`` (A, 5) rows of x, y, yaw, speed, accel, on the scene's ground map (the closed loop's
    observation, :mod:`blockpilot.sim.drive.world`); :func:`render_camera` is this at one step of the scene."""
    camera = _spec(camera)
    gmap = ground_map(scene)
    rays = _rays(camera)
    ex, ey, eyaw = (float(v) for v in ego_pose[:3])
    c, s = math.cos(eyaw), math.sin(eyaw)
    world = rays.offsets @ np.array([[c, s], [-s, c]]) + np.array([ex, ey])
    colour = _ground_colour(gmap, world) * rays.fade + HAZE * (1.0 - rays.fade)
    img = rays.sky.copy()
    img[rays.ground] = colour

    cam_pos = np.array([ex + c * camera.x - s * camera.y, ey + s * camera.x + c * camera.y, camera.z])
    world_to_optical = camera.optical_to_ego().T @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    boxes = _boxes(scene, agent_states, gmap)
    dist = [math.hypot(b.xy[0] - cam_pos[0], b.xy[1] - cam_pos[1]) for b in boxes]
    for i in np.argsort(dist)[::-1]:
        if dist[i] < MAX_RANGE:
            _draw_box(img, boxes[i], cam_pos, world_to_optical, camera, dist[i])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_box(img: FloatArray, box: Prop, cam_pos: FloatArray, world_to_optical: FloatArray, cam: CameraSpec,
              dist: float) -> None:
    length, width, height = box.size
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    bits = np.array([[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=np.float64)
    local = (bits - [0.5, 0.5, 0.0]) * [length, width, height] + [0.0, 0.0, box.z0]
    corners = local @ rot.T + [box.xy[0], box.xy[1], 0.0]
    optical = (corners - cam_pos) @ world_to_optical.T
    if (optical[:, 2] < 0.05).all():
        return
    fade = math.exp(-dist / FOG_M)
    for idx, normal in FACES:
        n_world = rot @ np.asarray(normal, dtype=np.float64)
        face = corners[list(idx)]
        if float(n_world @ (face.mean(axis=0) - cam_pos)) >= 0:
            continue
        poly = _clip_near(optical[list(idx)])
        if len(poly) < 3:
            continue
        pix = np.stack([cam.fx * poly[:, 0] / poly[:, 2] + cam.cx, cam.fy * poly[:, 1] / poly[:, 2] + cam.cy], axis=1)
        base = box.rear if normal[0] < 0 and box.rear is not None else box.colour
        shade = 0.55 + 0.45 * max(0.0, float(n_world @ SUN))
        _fill(img, pix, base * shade * fade + HAZE * (1 - fade))
