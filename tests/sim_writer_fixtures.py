"""Shared helpers of the format-writer tests: a stand-in camera and renderer, hand-built scenes with
exactly known motion, and a TFRecord reader written apart from the writer's."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockpilot.sim.types import Agent, Road, Scene, Track


@dataclass(frozen=True)
class Cam:
    name: str
    width: int = 64
    height: int = 48
    fx: float = 40.0
    fy: float = 40.0
    cx: float = 32.0
    cy: float = 24.0
    x: float = 1.7
    y: float = 0.0
    z: float = 1.5
    yaw: float = 0.0


FRONT = Cam("CAM_FRONT")
WOD = (Cam("FRONT"), Cam("FRONT_LEFT", yaw=0.8), Cam("FRONT_RIGHT", yaw=-0.8))


def render(scene: Scene, step: int, camera: Cam) -> np.ndarray:
    img = np.zeros((camera.height, camera.width, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, camera.width, dtype=np.uint8)[None, :]
    img[: camera.height // 2, :, 1] = (scene.seed * 37 + step * 5) % 256
    return img


def _track(xy: np.ndarray, dt: float) -> Track:
    vel = np.gradient(xy, dt, axis=0)
    speed = np.hypot(vel[:, 0], vel[:, 1])
    yaw = np.unwrap(np.arctan2(vel[:, 1], vel[:, 0])) if speed.min() > 0.1 else np.zeros(len(xy))
    return Track(np.column_stack([xy, yaw, speed, np.gradient(speed, dt)]))


def make_scene(seed: int, turn_rate: float, route: str) -> Scene:
    dt, t = 0.1, np.arange(101) * 0.1
    ego_xy = (np.column_stack([10 * t, 0 * t]) if turn_rate == 0 else
              np.column_stack([10 / turn_rate * np.sin(turn_rate * t), 10 / turn_rate * (1 - np.cos(turn_rate * t))]))
    agents = (
        Agent(1, "vehicle", (4.5, 1.9, 1.6), _track(np.column_stack([20 + 8 * t, 0 * t]), dt)),
        Agent(2, "pedestrian", (0.6, 0.6, 1.7), Track(np.column_stack(
            [30 + 0 * t, 6 - t, np.full_like(t, -np.pi / 2), np.ones_like(t), 0 * t]))),
        Agent(3, "cyclist", (1.8, 0.6, 1.7), _track(np.column_stack([15 + 4 * t, 3 + 0 * t]), dt)),
        Agent(4, "vehicle", (4.5, 1.9, 1.6), _track(np.column_stack([-200 + 0 * t, 90 + 0 * t]), dt)),
    )
    centre = ego_xy[::2]
    road = Road(centre, 3.5, 13.9, lanes=(centre, centre + np.array([0.0, 3.5])))
    return Scene(seed, f"unit-{seed}", dt, _track(ego_xy, dt), agents, road, route)


def render_any(scene: Scene, step: int, camera: Cam) -> np.ndarray:
    """The flat test pattern for hand-built scenes, the real renderer for generated ones."""
    from blockpilot.sim.render import render_camera

    return render(scene, step, camera) if scene.name.startswith("unit-") else render_camera(scene, step, camera)


def file_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_crc32c_bitwise(data: bytes) -> int:
    crc = crc32c_bitwise(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) % 2**32


def independent_records(path: Path) -> list[bytes]:
    raw, out, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<Q", raw, pos)
        assert struct.unpack_from("<I", raw, pos + 8)[0] == masked_crc32c_bitwise(raw[pos : pos + 8])
        data = raw[pos + 12 : pos + 12 + length]
        assert struct.unpack_from("<I", raw, pos + 12 + length)[0] == masked_crc32c_bitwise(data)
        out.append(data)
        pos += 16 + length
    assert pos == len(raw)
    return out
