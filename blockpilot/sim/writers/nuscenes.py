"""Synthetic scenes as a nuScenes dataroot that ``nuscenes-devkit`` loads.

Writes the 13 JSON tables under ``<dataroot>/<version>/``, keyframes at 2 Hz with a CAM_FRONT JPEG
and a small LIDAR_TOP ``.pcd.bin`` each, 3-D boxes for every agent within range, one semantic-prior
map PNG per scene (0.1 m per pixel, drivable lanes 255) and CAN-bus ``pose``/``ms_imu``/``route``/
``meta`` files. World coordinates are shifted per scene so the map's lower-left corner is the origin,
as the devkit's map mask expects. Every scene is its own log, labelled synthetic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blockpilot.geometry import to_ego_frame
from blockpilot.sim.types import Agent, FloatArray, Scene
from blockpilot.sim.writers._common import (
    SYNTHETIC_LABEL,
    CameraLike,
    RenderFn,
    default_render,
    matrix_quaternion,
    optical_rotation,
    project_to_image,
    render_jpeg,
    scene_start_us,
    step_time_us,
    steps_at_rate,
    synthetic_name,
    yaw_quaternion,
    yaw_rate,
)

VERSION = "v1.0-synthetic"
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")
MAP_RESOLUTION = 0.1  # metres per pixel; the devkit reads map masks at this native resolution
MAP_MARGIN_M = 40.0
ANNOTATION_RANGE_M = 60.0
LIDAR_MOUNT = (0.943, 0.0, 1.841)
LIDAR_YAW = -np.pi / 2  # as on the nuScenes car: lidar x points right, y forward
# Scene numbers the devkit's CAN-bus API refuses (logs without CAN data in the real release).
CAN_BLACKLIST = frozenset((*range(161, 169), *range(170, 177), *range(309, 315)))
CATEGORIES = {
    "vehicle": ("vehicle.car", "Synthetic passenger car."),
    "pedestrian": ("human.pedestrian.adult", "Synthetic adult pedestrian."),
    "cyclist": ("vehicle.bicycle", "Synthetic bicycle with its rider."),
}
ATTRIBUTES = {
    "vehicle.moving": "Vehicle is moving.",
    "vehicle.stopped": "Vehicle with a driver is stationary.",
    "vehicle.parked": "Vehicle without a driver is stationary.",
    "cycle.with_rider": "A rider is on the bicycle or motorcycle.",
    "cycle.without_rider": "Nobody is on the bicycle or motorcycle.",
    "pedestrian.moving": "The pedestrian is moving.",
    "pedestrian.standing": "The pedestrian is standing.",
    "pedestrian.sitting_lying_down": "The pedestrian is sitting or lying down.",
}
VISIBILITY = {"1": "v0-40", "2": "v40-60", "3": "v60-80", "4": "v80-100"}


def token(*parts: object) -> str:
    """A 32-hex token that is a pure function of its parts, so reruns give identical tables."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:32]


def _floats(values: Any, ndigits: int = 6) -> list[float]:
    return [round(float(v), ndigits) for v in values]


@dataclass
class _Tables:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {name: [] for name in TABLES})

    def add(self, table: str, **row: Any) -> str:
        self.rows[table].append(row)
        return str(row["token"])


def _link(rows: list[dict[str, Any]]) -> None:
    for i, row in enumerate(rows):
        row["prev"] = rows[i - 1]["token"] if i > 0 else ""
        row["next"] = rows[i + 1]["token"] if i + 1 < len(rows) else ""


def scene_numbers(count: int) -> list[int]:
    """``scene-NNNN`` numbers for ``count`` scenes, skipping those the CAN-bus API refuses."""
    numbers: list[int] = []
    n = 0
    while len(numbers) < count:
        n += 1
        if n not in CAN_BLACKLIST:
            numbers.append(n)
    if numbers and numbers[-1] > 9999:
        raise ValueError(f"{count} scenes do not fit the devkit's four-digit scene names")
    return numbers


def _map_frame(scene: Scene) -> tuple[FloatArray, tuple[int, int]]:
    """World-to-global shift (global = world - origin) and the map size (width, height) in pixels."""
    lo = scene.ego.xy.min(axis=0) - MAP_MARGIN_M
    hi = scene.ego.xy.max(axis=0) + MAP_MARGIN_M
    size = np.ceil((hi - lo) / MAP_RESOLUTION).astype(int)
    return lo, (int(size[0]), int(size[1]))


def _map_png(scene: Scene, origin: FloatArray, size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    half = scene.road.lane_width / MAP_RESOLUTION / 2

    def pixels(points: FloatArray) -> list[tuple[float, float]]:
        g = (np.asarray(points, dtype=np.float64) - origin) / MAP_RESOLUTION
        return [(float(x), float(size[1] - y)) for x, y in g]

    # A thick polyline of many short segments leaves slivers at the joints; a disc at every vertex fills them.
    for lane in scene.road.lanes or (scene.road.centerline,):
        pts = pixels(lane)
        draw.line(pts, fill=255, width=max(1, round(2 * half)))
        for x, y in pts:
            draw.ellipse((x - half, y - half, x + half, y + half), fill=255)
    for area in scene.road.junctions:
        draw.polygon(pixels(area), fill=255)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _box_corners(center: FloatArray, yaw: float, size: tuple[float, float, float], scale: float) -> FloatArray:
    length, width, height = (scale * v for v in size)
    sx, sy, sz = np.meshgrid([-0.5, 0.5], [-0.5, 0.5], [-0.5, 0.5], indexing="ij")
    local = np.stack([sx.ravel() * length, sy.ravel() * width, sz.ravel() * height], axis=1)
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return local @ rot.T + center


def _in_box(points: FloatArray, center: FloatArray, yaw: float, size: tuple[float, float, float]) -> int:
    c, s = np.cos(yaw), np.sin(yaw)
    d = points - center
    local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
    return int((np.abs(local) <= np.asarray(size) / 2 + 1e-9).all(axis=1).sum())


def _lidar_sensor_rotation() -> FloatArray:
    c, s = np.cos(LIDAR_YAW), np.sin(LIDAR_YAW)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _lidar_points(boxes_ego: list[tuple[FloatArray, float, Agent]]) -> FloatArray:
    """A sparse made-up sweep in the ego frame: a ground ring plus points inside each nearby box."""
    angles = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
    points = [np.stack([10 * np.cos(angles), 10 * np.sin(angles), np.zeros_like(angles)], axis=1)]
    for center, yaw, agent in boxes_ego:
        if np.hypot(center[0], center[1]) <= 50.0:
            points += [_box_corners(center, yaw, agent.size, 0.8), center[None, :]]
    return np.concatenate(points, axis=0)


def _write_pcd_bin(path: Path, points_ego: FloatArray) -> None:
    local = (points_ego - np.asarray(LIDAR_MOUNT)) @ _lidar_sensor_rotation()
    cloud = np.zeros((len(local), 5), dtype=np.float32)  # x, y, z, intensity, ring index
    cloud[:, :3] = local
    cloud[:, 3] = 50.0
    path.write_bytes(cloud.tobytes())


def _write_scene(tables: _Tables, root: Path, scene: Scene, number: int, ordinal: int,
                 cameras: dict[str, CameraLike], render: RenderFn, keyframe_hz: float) -> None:
    camera = cameras["CAM_FRONT"]  # annotations' visibility is judged in the front camera
    name = f"scene-{number:04d}"
    label = synthetic_name(scene)
    key = f"{name}/{label}/{scene.seed}"  # tokens differ between dataroots holding different scenes
    origin, map_size = _map_frame(scene)
    log_tok = tables.add("log", token=token("log", key), logfile=label, vehicle="blockpilot-synthetic",
                         date_captured="2023-11-14", location=f"synthetic-{scene.seed}")
    map_tok = token("map", key)
    (root / "maps").mkdir(exist_ok=True)
    (root / "maps" / f"{map_tok}.png").write_bytes(_map_png(scene, origin, map_size))
    tables.add("map", token=map_tok, log_tokens=[log_tok], category="semantic_prior",
               filename=f"maps/{map_tok}.png")
    calib = {
        channel: tables.add("calibrated_sensor", token=token("calib", key, channel),
                            sensor_token=token("sensor", channel), translation=_floats((cam.x, cam.y, cam.z)),
                            rotation=_floats(matrix_quaternion(optical_rotation(cam)), 8),
                            camera_intrinsic=[[cam.fx, 0.0, cam.cx], [0.0, cam.fy, cam.cy], [0.0, 0.0, 1.0]])
        for channel, cam in cameras.items()}
    calib.update({
        "LIDAR_TOP": tables.add("calibrated_sensor", token=token("calib", key, "LIDAR_TOP"),
                                sensor_token=token("sensor", "LIDAR_TOP"), translation=list(LIDAR_MOUNT),
                                rotation=_floats(matrix_quaternion(_lidar_sensor_rotation()), 8),
                                camera_intrinsic=[]),
    })
    steps = steps_at_rate(scene, keyframe_hz)
    samples: list[dict[str, Any]] = []
    data_rows: dict[str, list[dict[str, Any]]] = {**{c: [] for c in cameras}, "LIDAR_TOP": []}
    anns: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        utime = scene_start_us(ordinal) + step_time_us(scene, step)
        sample_tok = token("sample", key, step)
        samples.append({"token": sample_tok, "timestamp": utime, "scene_token": token("scene", key)})
        ego_xy, ego_yaw = scene.ego.xy[step], float(scene.ego.yaw[step])
        boxes_ego = []
        for agent in scene.agents:
            rel = to_ego_frame(agent.track.xy[step : step + 1], ego_xy, ego_yaw)[0]
            if np.hypot(*rel) > ANNOTATION_RANGE_M:
                continue
            center = np.array([rel[0], rel[1], agent.size[2] / 2])
            boxes_ego.append((center, float(agent.track.yaw[step]) - ego_yaw, agent))
        points = _lidar_points(boxes_ego)
        for channel, fmt, ext in (*((c, "jpg", "jpg") for c in cameras), ("LIDAR_TOP", "pcd", "pcd.bin")):
            rel_path = f"samples/{channel}/{label}__{channel}__{utime}.{ext}"
            (root / "samples" / channel).mkdir(parents=True, exist_ok=True)
            cam = cameras.get(channel)
            if cam is not None:
                (root / rel_path).write_bytes(render_jpeg(render, scene, step, cam))
            else:
                _write_pcd_bin(root / rel_path, points)
            pose_tok = tables.add("ego_pose", token=token("ego_pose", key, channel, step),
                                  translation=_floats((*(ego_xy - origin), 0.0)),
                                  rotation=_floats(yaw_quaternion(ego_yaw), 8), timestamp=utime)
            data_rows[channel].append({
                "token": token("sample_data", key, channel, step), "sample_token": sample_tok,
                "ego_pose_token": pose_tok, "calibrated_sensor_token": calib[channel], "timestamp": utime,
                "fileformat": fmt, "is_key_frame": True, "height": cam.height if cam is not None else 0,
                "width": cam.width if cam is not None else 0, "filename": rel_path})
        for center, rel_yaw, agent in boxes_ego:
            row = _annotation(key, sample_tok, step, agent, center, rel_yaw, origin, points, camera)
            anns.setdefault(agent.agent_id, []).append(row)
    for rows in (samples, *data_rows.values(), *anns.values()):
        _link(rows)
    tables.rows["sample"] += samples
    for rows in data_rows.values():
        tables.rows["sample_data"] += rows
    for agent in scene.agents:
        rows = anns.get(agent.agent_id, [])
        if rows:
            tables.add("instance", token=rows[0]["instance_token"],
                       category_token=token("category", CATEGORIES[agent.kind][0]), nbr_annotations=len(rows),
                       first_annotation_token=rows[0]["token"], last_annotation_token=rows[-1]["token"])
            tables.rows["sample_annotation"] += rows
    tables.add("scene", token=token("scene", key), log_token=log_tok, nbr_samples=len(samples),
               first_sample_token=samples[0]["token"], last_sample_token=samples[-1]["token"], name=name,
               description=f"{SYNTHETIC_LABEL} {label}, seed {scene.seed}, route command: {scene.route_command}")
    _write_can_bus(root / "can_bus", name, scene, origin, scene_start_us(ordinal))


def _annotation(key: str, sample_tok: str, step: int, agent: Agent, center: FloatArray, rel_yaw: float,
                origin: FloatArray, points: FloatArray, camera: CameraLike) -> dict[str, Any]:
    """One sample_annotation row (prev/next linked later); visible means its centre is in CAM_FRONT."""
    pix, depth = project_to_image(camera, center[None, :])
    seen = depth[0] > 0.5 and 0 <= pix[0, 0] < camera.width and 0 <= pix[0, 1] < camera.height
    xy = agent.track.xy[step] - origin
    return {
        "token": token("sample_annotation", key, agent.agent_id, step), "sample_token": sample_tok,
        "instance_token": token("instance", key, agent.agent_id), "visibility_token": "4" if seen else "1",
        "attribute_tokens": [token("attribute", _attribute(agent, step))],
        "translation": _floats((xy[0], xy[1], center[2])),
        "size": _floats((agent.size[1], agent.size[0], agent.size[2])),  # nuScenes boxes are w, l, h
        "rotation": _floats(yaw_quaternion(float(agent.track.yaw[step])), 8),
        "num_lidar_pts": _in_box(points, center, rel_yaw, agent.size), "num_radar_pts": 0}


def _attribute(agent: Agent, step: int) -> str:
    moving = float(agent.track.speed[step]) > 0.3
    if agent.kind == "vehicle":
        return "vehicle.moving" if moving else "vehicle.stopped"
    if agent.kind == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    return "cycle.with_rider"


def _write_can_bus(can_dir: Path, name: str, scene: Scene, origin: FloatArray, start_us: int) -> None:
    """CAN-bus pose and IMU at the scene's step rate, the ego lane as the route, and their stats."""
    can_dir.mkdir(parents=True, exist_ok=True)
    omega = yaw_rate(scene.ego, scene.dt)
    pose, imu = [], []
    for i in range(scene.num_steps):
        utime = start_us + step_time_us(scene, i)
        v, a, w = float(scene.ego.speed[i]), float(scene.ego.accel[i]), float(omega[i])
        q = _floats(yaw_quaternion(float(scene.ego.yaw[i])), 8)
        pose.append({"utime": utime, "pos": _floats((*(scene.ego.xy[i] - origin), 0.0)), "orientation": q,
                     "vel": _floats((v, 0.0, 0.0)), "accel": _floats((a, v * w, 0.0)),
                     "rotation_rate": _floats((0.0, 0.0, w))})
        imu.append({"utime": utime, "linear_accel": _floats((a, v * w, 9.81)), "q": q,
                    "rotation_rate": _floats((0.0, 0.0, w))})
    span = scene.duration_s
    meta = {key: {"message_count": len(msgs), "message_freq": round(len(msgs) / span, 3) if span else 0.0,
                  "timespan": round(span, 3)} for key, msgs in (("ms_imu", imu), ("pose", pose))}
    route = [_floats(p, 3) for p in np.asarray(scene.road.centerline) - origin]
    for kind, payload in (("pose", pose), ("ms_imu", imu), ("route", route), ("meta", meta)):
        (can_dir / f"{name}_{kind}.json").write_text(json.dumps(payload, indent=1))


def write_nuscenes(scenes: Sequence[Scene], dataroot: str | Path, *, version: str = VERSION,
                   camera: CameraLike | None = None, render: RenderFn | None = None,
                   keyframe_hz: float = 2.0, cameras: Sequence[CameraLike] | None = None) -> Path:
    """Write ``scenes`` as a nuScenes dataroot (tables under ``dataroot/version``); returns ``dataroot``.

    ``camera`` is the CAM_FRONT camera (default :data:`blockpilot.sim.cameras.FRONT_CAMERA`); ``cameras``
    instead writes a whole rig, each named by its nuScenes channel (``CAM_FRONT`` ... ``CAM_BACK_RIGHT``, e.g.
    :data:`blockpilot.sim.cameras.NUSCENES_CAMERAS`, 1600x900 as on the nuScenes car); it must hold CAM_FRONT.
    """
    if not scenes:
        raise ValueError("write_nuscenes needs at least one scene")
    if camera is not None and cameras is not None:
        raise ValueError("pass camera (CAM_FRONT only) or cameras (a rig), not both")
    if cameras is None:
        from blockpilot.sim.cameras import FRONT_CAMERA

        cameras = [camera or FRONT_CAMERA]
        rig: dict[str, CameraLike] = {"CAM_FRONT": cameras[0]}
    else:
        rig = {c.name: c for c in cameras}
        if len(rig) != len(cameras) or "CAM_FRONT" not in rig or not all(n.startswith("CAM_") for n in rig):
            raise ValueError(f"cameras must be distinct CAM_* channels including CAM_FRONT, got "
                             f"{[c.name for c in cameras]}")
    root = Path(dataroot)
    root.mkdir(parents=True, exist_ok=True)
    tables = _Tables()
    for channel, modality in (*((c, "camera") for c in rig), ("LIDAR_TOP", "lidar")):
        tables.add("sensor", token=token("sensor", channel), channel=channel, modality=modality)
    for cat, desc in CATEGORIES.values():
        tables.add("category", token=token("category", cat), name=cat, description=desc)
    for attr, desc in ATTRIBUTES.items():
        tables.add("attribute", token=token("attribute", attr), name=attr, description=desc)
    for vis, level in VISIBILITY.items():
        tables.add("visibility", token=vis, level=level, description=f"visible fraction {level[1:]} %")
    render_fn = render or default_render()
    for ordinal, (scene, number) in enumerate(zip(scenes, scene_numbers(len(scenes)), strict=True)):
        _write_scene(tables, root, scene, number, ordinal, rig, render_fn, keyframe_hz)
    table_dir = root / version
    table_dir.mkdir(exist_ok=True)
    for name, rows in tables.rows.items():
        (table_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return root
