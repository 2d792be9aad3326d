"""A replay source over a nuScenes dataroot, read straight from its JSON tables (no devkit).

Every keyframe (``sample``) of the chosen scenes becomes one item, in ``scene.json`` order and along
each scene's ``first_sample_token``/``next`` chain. Conventions:

* **Ego pose** of a sample: the ``ego_pose`` of its LIDAR_TOP keyframe ``sample_data`` (the first
  requested camera's when there is no LIDAR_TOP). The ego frame at t0 is that pose with only its
  heading kept (x forward along the ground, y left), so pitch and roll never tilt the plan.
* **History**: the ego positions of the 4 previous keyframes at -2.0 .. -0.5 s, each within 0.1 s of
  its nominal time, in the t0 ego frame (oldest first); fewer -> a ``skipped`` failure.
* **Ground truth**: the next 6 keyframes at 0.5 .. 3.0 s, each valid when it exists and lies within
  0.1 s of its nominal time; invalid points repeat the last valid one (zeros before any).
* **frame="lidar"**: the origin is the t0 LIDAR_TOP sensor (``ego_pose`` composed with its
  ``calibrated_sensor``) and the future tracks that sensor (each future keyframe's own pose and
  calibration). The lidar axes are turned to forward/left by the quarter turn nearest the sensor's
  calibrated yaw in the ego frame (-90 degrees for nuScenes' x-right/y-forward lidar, giving
  forward = y_l, left = -x_l); a lidar mounted any other quarter-turn way is turned alike. The
  sensor's residual mounting angles are kept, so this is the lidar frame up to a fixed rotation.
  Past waypoints stay in the ego frame (the prompt's frame).
* **Speed / acceleration**: from ``can_bus/<scene>_pose.json`` (the last message at or before the
  sample: ``vel[0]``, ``accel[0]``) when there is one, else from the keyframe poses (distance over
  time between the last two keyframes, acceleration from the last two such speeds).
* **Route command** (nuScenes has none), as VAD/UniAD derive it: the last valid ground-truth point's
  left offset in the ego frame, >= 2 m "turn left", <= -2 m "turn right", else "go straight".
* **Agents**: instances annotated at t0 whose category is ``vehicle.*`` or ``human.pedestrian.*``;
  their boxes at each valid future keyframe where they are annotated, in the evaluation frame at t0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BlockpilotError
from ..geometry import Pose, matrix_yaw, quarter_turn, rot_z
from ..vla.prompt import EgoState
from .nuscenes_tables import field, find_version, load_table, read_can_pose, read_image
from .types import (
    FRAMES,
    AgentBoxes,
    DatasetError,
    EvalSample,
    SampleError,
    SampleFailure,
    Trajectory,
    route_command_from_future,
)

PAST_TIMES_S = (-2.0, -1.5, -1.0, -0.5)
FUTURE_TIMES_S = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
TIME_TOLERANCE_US = 100_000
LIDAR = "LIDAR_TOP"
REQUIRED_TABLES = ("sample", "sample_data", "ego_pose", "calibrated_sensor", "sensor", "scene")
AGENT_TABLES = ("instance", "category", "sample_annotation")
AGENT_KINDS = (("vehicle.", "vehicle"), ("human.pedestrian.", "pedestrian"))
STP3_OFFSET_M = 0.5  # ST-P3 puts the ego footprint's centre this far ahead of the lidar
Row = dict[str, Any]


class _Skip(BlockpilotError):
    """A sample left out by design (too little history)."""


@dataclass(frozen=True)
class _Scene:
    name: str
    tokens: tuple[str, ...]  # the sample chain, first to last
    broken: tuple[str, str] | None  # (sample_id, reason) where the chain breaks off


class NuScenesSource:
    """Planning samples from a nuScenes dataroot (see the module docstring for the conventions)."""

    name = "nuscenes"

    def __init__(self, dataroot: str | Path, version: str = "auto", *, frame: str = "ego",
                 cameras: Sequence[str] = ("CAM_FRONT",), scenes: Sequence[str] | None = None,
                 keyframe_stride: int = 1) -> None:
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
        if not cameras or not all(isinstance(c, str) and c for c in cameras):
            raise ValueError(f"cameras must name at least one channel, got {cameras!r}")
        if isinstance(keyframe_stride, bool) or not isinstance(keyframe_stride, int) or keyframe_stride < 1:
            raise ValueError(f"keyframe_stride must be a positive integer, got {keyframe_stride!r}")
        self.dataroot = Path(dataroot)
        if not self.dataroot.is_dir():
            raise DatasetError(f"{self.dataroot}: nuScenes dataroot not found")
        self.version = find_version(self.dataroot, version)
        self.frame, self.cameras, self.keyframe_stride = frame, cameras, keyframe_stride
        self.scene_filter = None if scenes is None else ((scenes,) if isinstance(scenes, str) else tuple(scenes))
        table_dir = self.dataroot / self.version
        t = {name: load_table(table_dir / f"{name}.json") for name in REQUIRED_TABLES}
        self._samples, self._calib, self._sensors = t["sample"], t["calibrated_sensor"], t["sensor"]
        self._keyframes: dict[str, list[Row]] = {}
        for row in t["sample_data"].values():
            if row.get("is_key_frame"):
                self._keyframes.setdefault(str(row.get("sample_token")), []).append(row)
        wanted = {row.get("ego_pose_token") for rows in self._keyframes.values() for row in rows}
        self._poses = {tok: row for tok, row in t["ego_pose"].items() if tok in wanted}  # sweeps dropped
        self._agents_on = all((table_dir / f"{name}.json").is_file() for name in AGENT_TABLES)
        self._annotations: dict[str, list[Row]] = {}
        self._instances: dict[str, Row] = {}
        self._categories: dict[str, Row] = {}
        if self._agents_on:
            self._instances = load_table(table_dir / "instance.json")
            self._categories = load_table(table_dir / "category.json")
            for row in load_table(table_dir / "sample_annotation.json").values():
                self._annotations.setdefault(str(row.get("sample_token")), []).append(row)
        self._scenes = self._walk_scenes(list(t["scene"].values()), table_dir / "scene.json")
        self._can: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | str | None] = {}
        self._length = sum(len(range(0, len(s.tokens) + (s.broken is not None), keyframe_stride))
                           for s in self._scenes)

    def _walk_scenes(self, rows: list[Row], path: Path) -> list[_Scene]:
        names = [str(row.get("name", row["token"])) for row in rows]
        if self.scene_filter is not None:
            unknown = sorted(set(self.scene_filter) - set(names))
            if unknown:
                raise DatasetError(f"{path}: no scene named {unknown} (it has {len(names)}: {names[:5]} ...)")
            rows = [row for row, name in zip(rows, names, strict=True) if name in self.scene_filter]
        scenes = []
        for row in rows:
            name, tokens, seen = str(row.get("name", row["token"])), [], set()
            tok, where, broken = str(row.get("first_sample_token") or ""), f"scene {name}.first_sample_token", None
            while tok:
                if tok in seen:
                    broken = (f"nuscenes/{name}/loop", f"{where} loops back to sample {tok}")
                    break
                if tok not in self._samples:
                    broken = (f"nuscenes/{tok}", f"{where}: the sample table has no token {tok}")
                    break
                seen.add(tok)
                tokens.append(tok)
                where, tok = f"sample {tok}.next", str(self._samples[tok].get("next") or "")
            scenes.append(_Scene(name, tuple(tokens), broken))
        return scenes

    def __len__(self) -> int:
        return self._length

    def describe(self) -> dict[str, Any]:
        return {"dataroot": str(self.dataroot), "version": self.version, "frame": self.frame,
                "cameras": list(self.cameras), "scenes": len(self._scenes),
                "scene_filter": None if self.scene_filter is None else list(self.scene_filter),
                "samples": len(self), "keyframe_stride": self.keyframe_stride, "agents": self._agents_on}

    def __iter__(self) -> Iterator[EvalSample | SampleFailure]:
        for scene in self._scenes:
            for i in range(0, len(scene.tokens) + (scene.broken is not None), self.keyframe_stride):
                if i == len(scene.tokens) and scene.broken is not None:
                    yield SampleFailure(scene.broken[0], self.name, scene.name, scene.broken[1])
                    continue
                sample_id = f"nuscenes/{scene.tokens[i]}"
                try:
                    item: EvalSample | SampleFailure = self._build(scene, i)
                except _Skip as exc:
                    item = SampleFailure(sample_id, self.name, scene.name, str(exc), kind="skipped")
                except (SampleError, ValueError, TypeError) as exc:  # also records the types refuse
                    item = SampleFailure(sample_id, self.name, scene.name, str(exc))
                yield item

    def _timestamp(self, tok: str) -> int:
        value = field(self._samples[tok], "sample", "timestamp")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SampleError(f"sample {tok}: timestamp {value!r} is not a finite number")
        return int(value)

    def _channels(self, tok: str) -> dict[str, Row]:
        """The keyframe sample_data rows of a sample by channel (calibrated_sensor -> sensor.channel)."""
        out: dict[str, Row] = {}
        for row in self._keyframes.get(tok, []):
            calib_tok = field(row, "sample_data", "calibrated_sensor_token")
            if calib_tok not in self._calib:
                raise SampleError(f"sample_data {row['token']}.calibrated_sensor_token: "
                                  f"the calibrated_sensor table has no token {calib_tok}")
            sensor_tok = field(self._calib[calib_tok], "calibrated_sensor", "sensor_token")
            if sensor_tok not in self._sensors:
                raise SampleError(f"calibrated_sensor {calib_tok}.sensor_token: "
                                  f"the sensor table has no token {sensor_tok}")
            out.setdefault(str(field(self._sensors[sensor_tok], "sensor", "channel")), row)
        return out

    def _pose_row(self, tok: str, channels: dict[str, Row] | None = None) -> Row:
        channels = self._channels(tok) if channels is None else channels
        row = channels.get(LIDAR) or channels.get(self.cameras[0])
        if row is None:
            raise SampleError(f"sample {tok}: no keyframe sample_data for {LIDAR} or {self.cameras[0]} (no ego pose)")
        return row

    def _keyframe(self, tok: str, offset: float, sensor: bool) -> tuple[Pose, Pose | None]:
        """Ego pose of the keyframe ``offset`` s away and, if ``sensor``, its LIDAR_TOP pose, both in the world."""
        try:
            channels = self._channels(tok)
            ego = self._ego_pose(self._pose_row(tok, channels))
            if not sensor:
                return ego, None
            if LIDAR not in channels:
                raise SampleError(f"sample {tok}: frame='lidar' needs a {LIDAR} keyframe sample_data")
            return ego, ego.compose(self._sensor_pose(channels[LIDAR]))
        except SampleError as exc:
            raise SampleError(f"keyframe at {offset:+.1f} s: {exc}") from None

    def _ego_pose(self, sd: Row) -> Pose:
        tok = field(sd, "sample_data", "ego_pose_token")
        if tok not in self._poses:
            raise SampleError(f"sample_data {sd['token']}.ego_pose_token: the ego_pose table has no token {tok}")
        return self._record_pose(self._poses[tok], "ego_pose")

    def _sensor_pose(self, sd: Row) -> Pose:
        return self._record_pose(self._calib[sd["calibrated_sensor_token"]], "calibrated_sensor")

    @staticmethod
    def _record_pose(row: Row, table: str) -> Pose:
        try:
            return Pose.from_record(field(row, table, "translation"), field(row, table, "rotation"))
        except (ValueError, TypeError) as exc:
            raise SampleError(f"{table} {row.get('token')}: {exc}") from None

    def _can_bus(self, scene: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str | None:
        """(utime, vel[0], accel[0]) arrays of the scene's CAN pose messages; None without a file, or
        the reason the file cannot be used."""
        if scene not in self._can:
            self._can[scene] = read_can_pose(self.dataroot / "can_bus" / f"{scene}_pose.json")
        return self._can[scene]

    def _build(self, scene: _Scene, i: int) -> EvalSample:
        tokens, tok = scene.tokens, scene.tokens[i]
        t0 = self._timestamp(tok)
        if i < len(PAST_TIMES_S):
            raise _Skip(f"needs 2.0 s of history (the scene has {i} earlier keyframes)")
        past_tokens = tokens[i - len(PAST_TIMES_S) : i]
        past_ts = [self._timestamp(p) for p in past_tokens]
        for offset, ts in zip(PAST_TIMES_S, past_ts, strict=True):
            if abs(ts - t0 - offset * 1e6) > TIME_TOLERANCE_US:
                raise _Skip(f"needs 2.0 s of history (the keyframe for {offset:+.1f} s is at {(ts - t0) / 1e6:+.2f} s)")
        channels = self._channels(tok)
        missing = [c for c in self.cameras if c not in channels]
        if missing:
            raise SampleError(f"sample {tok}: no keyframe sample_data for camera {', '.join(missing)}")
        ego0 = self._ego_pose(self._pose_row(tok, channels))
        ego_frame = ego0.ground_aligned()
        past = np.array([ego_frame.to_local(self._keyframe(p, off, False)[0].translation[None])[0, :2]
                         for p, off in zip(past_tokens, PAST_TIMES_S, strict=True)])
        extra: dict[str, Any] = {"sample_token": tok, "route_command_from": "gt_future"}
        lidar0 = channels.get(LIDAR)
        eval_frame, box_offset = ego_frame, STP3_OFFSET_M
        if self.frame == "lidar":
            if lidar0 is None:
                raise SampleError(f"sample {tok}: frame='lidar' needs a {LIDAR} keyframe sample_data")
            calib0 = self._sensor_pose(lidar0)
            turn = quarter_turn(matrix_yaw(calib0.rotation))
            sensor0 = ego0.compose(calib0)
            eval_frame = Pose(sensor0.rotation @ rot_z(turn).T, sensor0.translation)
            extra["lidar_turn_deg"] = round(math.degrees(turn))
            # Where the tracked point sits on the car: predictions of the ego origin move here.
            extra["lidar_mount_xy"] = [float(v) for v in calib0.translation[:2]]
        elif lidar0 is None:
            extra["ego_box_offset_from"] = f"no {LIDAR}: 0.5 m ahead of the ego origin"
        else:
            box_offset += float(self._sensor_pose(lidar0).translation[0])

        # ground truth: the next keyframes at their nominal times
        n = len(FUTURE_TIMES_S)
        xy_eval, xy_ego, valid = np.zeros((n, 2)), np.zeros((n, 2)), np.zeros(n, dtype=bool)
        future_tokens: list[str | None] = [None] * n
        for k, ftok in enumerate(tokens[i + 1 : i + 1 + n]):
            if abs(self._timestamp(ftok) - t0 - FUTURE_TIMES_S[k] * 1e6) > TIME_TOLERANCE_US:
                continue
            ego_k, sensor_k = self._keyframe(ftok, FUTURE_TIMES_S[k], self.frame == "lidar")
            xy_ego[k] = ego_frame.to_local(ego_k.translation[None])[0, :2]
            xy_eval[k] = xy_ego[k] if sensor_k is None else eval_frame.to_local(sensor_k.translation[None])[0, :2]
            valid[k], future_tokens[k] = True, ftok
        for j in np.flatnonzero(~valid):  # repeat the last valid point (zeros before any)
            xy_eval[j], xy_ego[j] = (xy_eval[j - 1], xy_ego[j - 1]) if j else (0.0, 0.0)
        route = route_command_from_future(xy_ego, valid)

        speed, accel = self._ego_state(scene.name, t0, past, past_ts, extra)
        files = [str(field(channels[c], "sample_data", "filename")) for c in self.cameras]
        root = self.dataroot
        return EvalSample(
            sample_id=f"nuscenes/{tok}", source=self.name, scene=scene.name, timestamp_us=t0,
            ego=EgoState(past_waypoints=past, speed_mps=speed, accel_mps2=accel), route_command=route,
            load_images=lambda: [read_image(root, f) for f in files],
            future=Trajectory(times_s=np.array(FUTURE_TIMES_S), xy=xy_eval, valid=valid),
            agents=self._agents(tok, future_tokens, eval_frame) if self._agents_on else None,
            image_names=tuple(files), frame=self.frame, ego_box_offset_m=box_offset, extra=extra)

    def _ego_state(self, scene: str, t0: int, past: np.ndarray, past_ts: list[int],
                   extra: dict[str, Any]) -> tuple[float, float]:
        can = self._can_bus(scene)
        if isinstance(can, tuple):
            idx = int(np.searchsorted(can[0], t0, side="right")) - 1
            if idx >= 0 and math.isfinite(can[1][idx]) and math.isfinite(can[2][idx]):
                extra["ego_state_from"] = "can_bus"
                return float(can[1][idx]), float(can[2][idx])
            extra["can_bus_note"] = ("no CAN pose message at or before the sample" if idx < 0
                                     else "non-finite CAN pose message")
        elif isinstance(can, str):
            extra["can_bus_note"] = can
        # from the keyframe poses: in the t0 ego frame the current position is the origin
        pts = np.vstack([past[-2:], np.zeros((1, 2))])
        dts = np.diff(np.array([*past_ts[-2:], t0], dtype=np.float64)) / 1e6
        if np.any(dts <= 0):
            raise SampleError(f"sample timestamps {[*past_ts[-2:], t0]} do not increase")
        speeds = np.hypot(*np.diff(pts, axis=0).T) / dts
        extra["ego_state_from"] = "ego_pose"
        return float(speeds[1]), float((speeds[1] - speeds[0]) / (0.5 * (dts[0] + dts[1])))

    def _agents(self, tok: str, future_tokens: list[str | None], frame: Pose) -> AgentBoxes:
        tracked: dict[str, tuple[int, str]] = {}
        for ann in self._annotations.get(tok, []):
            inst_tok = field(ann, "sample_annotation", "instance_token")
            inst = self._instances.get(inst_tok)
            if inst is None:
                raise SampleError(f"sample_annotation {ann['token']}.instance_token: "
                                  f"the instance table has no token {inst_tok}")
            cat = self._categories.get(field(inst, "instance", "category_token"))
            if cat is None:
                raise SampleError(f"instance {inst_tok}.category_token: the category table has no token "
                                  f"{inst['category_token']}")
            name = str(field(cat, "category", "name"))
            kind = next((k for prefix, k in AGENT_KINDS if name.startswith(prefix)), None)
            if kind is not None and inst_tok not in tracked:
                tracked[inst_tok] = (len(tracked), kind)
        boxes: list[np.ndarray] = []
        kinds: list[tuple[str, ...]] = []
        for ftok in future_tokens:
            rows = [] if ftok is None else sorted(
                (a for a in self._annotations.get(ftok, []) if a.get("instance_token") in tracked),
                key=lambda a: tracked[a["instance_token"]][0])
            out = np.zeros((len(rows), 5))
            for r, ann in enumerate(rows):
                pose = self._record_pose(ann, "sample_annotation")
                size = np.asarray(field(ann, "sample_annotation", "size"), dtype=np.float64)
                if size.shape != (3,) or not np.isfinite(size).all():
                    raise SampleError(f"sample_annotation {ann['token']}: size {size.tolist()} is not 3 finite numbers")
                centre = frame.to_local(pose.translation[None])[0]
                heading = frame.direction_to_local(pose.rotation[:, 0][None])[0]
                out[r] = (centre[0], centre[1], math.atan2(heading[1], heading[0]), size[1], size[0])  # size: w, l, h
            boxes.append(out)
            kinds.append(tuple(tracked[a["instance_token"]][1] for a in rows))
        return AgentBoxes(times_s=np.array(FUTURE_TIMES_S), boxes=tuple(boxes), kinds=tuple(kinds))

