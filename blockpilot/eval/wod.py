"""WOD-E2E replay: TFRecords of ``E2EDFrame`` (Waymo Open Dataset end-to-end driving) as eval samples.

Each record is one planning instant. Its ``past_states`` run at 4 Hz up to t = 0 (the last state is
now) and its ``future_states`` at 4 Hz from 0.25 s, both already in the ego frame at t = 0 (x forward,
y left); the test split has no future. ``preference_trajectories`` are the raters' futures with
their scores (an unrated one has no score or a negative one and is left out). Records are read one
at a time: a broken record (CRC, protobuf) becomes a :class:`SampleFailure` and the next one follows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ..formats.tfrecord import TFRecordError, count_tfrecords, scan_tfrecord
from ..formats.wod import dataset_pb2 as wod
from ..formats.wod import end_to_end_driving_data_pb2 as e2e
from ..vla.prompt import EgoState
from .images import decode_image
from .types import DatasetError, EvalSample, ImageArray, RatedTrajectory, SampleFailure, Trajectory

STATE_HZ = 4.0
PAST_OFFSETS = (8, 6, 4, 2)  # states before the last one: -2.0, -1.5, -1.0, -0.5 s at 4 Hz
MIN_PAST_STATES = PAST_OFFSETS[0] + 1
INTENT_COMMANDS = {"GO_STRAIGHT": "go straight", "GO_LEFT": "turn left", "GO_RIGHT": "turn right"}
DEFAULT_COMMAND = "go straight"
CAMERA_NAMES = tuple(name for name, _ in wod.CameraName.Name.items() if name != "UNKNOWN")


def tfrecord_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else every file in the directory whose name holds ``.tfrecord``."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DatasetError(f"WOD-E2E path {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file() and ".tfrecord" in p.name)
    if not files:
        raise DatasetError(f"WOD-E2E directory {root} holds no file whose name contains '.tfrecord'")
    return files


def _xy(states: e2e.EgoTrajectoryStates, what: str) -> np.ndarray:
    if len(states.pos_x) != len(states.pos_y):
        raise ValueError(f"{what} has {len(states.pos_x)} pos_x but {len(states.pos_y)} pos_y")
    return np.column_stack([np.asarray(states.pos_x, dtype=np.float64),
                            np.asarray(states.pos_y, dtype=np.float64)]).reshape(-1, 2)


class WodE2ESource:
    """Samples from a WOD-E2E TFRecord file or a directory of them (files in name order)."""

    name = "wod"

    def __init__(self, path: str | Path, *, cameras: Sequence[str] = ("FRONT",)) -> None:
        self.path = Path(path)
        self.files = tfrecord_files(self.path)
        unknown = [c for c in cameras if c not in CAMERA_NAMES]
        if unknown or not cameras:
            raise ValueError(f"cameras must be WOD camera names ({', '.join(CAMERA_NAMES)}), got {list(cameras)}")
        self.cameras = tuple(cameras)
        self._count: int | None = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(self._count_file(f) for f in self.files)
        return self._count

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "path": str(self.path), "files": [str(f) for f in self.files],
                "cameras": list(self.cameras), "records": len(self), "frame": "ego"}

    def __iter__(self) -> Iterator[EvalSample | SampleFailure]:
        for file in self.files:
            try:
                records = scan_tfrecord(file)
                for index, item in records:
                    yield self._item(file, index, item)
            except OSError as exc:
                raise DatasetError(f"WOD-E2E file {file} cannot be read: {exc}") from exc

    @staticmethod
    def _count_file(file: Path) -> int:
        try:
            return count_tfrecords(file)
        except OSError as exc:
            raise DatasetError(f"WOD-E2E file {file} cannot be read: {exc}") from exc

    def _item(self, file: Path, index: int, item: bytes | TFRecordError) -> EvalSample | SampleFailure:
        record_id = f"wod/{file.name}/record-{index}"
        if isinstance(item, TFRecordError):
            return SampleFailure(record_id, self.name, file.name, str(item))
        try:
            frame = e2e.E2EDFrame.FromString(item)
        except DecodeError as exc:
            return SampleFailure(record_id, self.name, file.name,
                                 f"{file}: record {index} is not an E2EDFrame ({exc})")
        context = frame.frame.context
        if not context.name or not frame.frame.HasField("timestamp_micros"):
            return SampleFailure(record_id, self.name, file.name,
                                 f"{file}: record {index} has no frame.context.name or frame.timestamp_micros")
        sample_id = f"wod/{context.name}/{frame.frame.timestamp_micros}"
        try:
            return self._sample(frame, sample_id, file, index)
        except ValueError as exc:  # mismatched state lengths, non-finite values
            return SampleFailure(sample_id, self.name, context.name, f"{file}: record {index}: {exc}")

    def _sample(self, frame: e2e.E2EDFrame, sample_id: str, file: Path, index: int) -> EvalSample | SampleFailure:
        scene, where = frame.frame.context.name, f"{file}: record {index}"
        past = _xy(frame.past_states, "past_states")
        if len(past) < MIN_PAST_STATES:
            return SampleFailure(sample_id, self.name, scene, f"{where}: {len(past)} past states, the prompt needs "
                                 f"{MIN_PAST_STATES} (2 s at 4 Hz)", kind="skipped")
        images = {wod.CameraName.Name.Name(i.name): i.image for i in frame.frame.images}  # proto2: known names only
        missing = [c for c in self.cameras if c not in images]
        if missing:
            return SampleFailure(sample_id, self.name, scene, f"{where}: no image from camera {', '.join(missing)} "
                                 f"(frame has {', '.join(images) or 'none'})")
        extra: dict[str, Any] = {"file": file.name, "record": index}
        ego = EgoState(past_waypoints=past[[len(past) - 1 - k for k in PAST_OFFSETS]],
                       speed_mps=self._speed(frame.past_states, past, extra),
                       accel_mps2=self._accel(frame.past_states, extra))
        intent_name = e2e.EgoIntent.Intent.Name(frame.intent)  # proto2 reads an unknown value as UNKNOWN
        extra["intent"] = intent_name
        future_xy = _xy(frame.future_states, "future_states")
        future = (Trajectory(times_s=(np.arange(len(future_xy)) + 1) / STATE_HZ, xy=future_xy,
                             valid=np.ones(len(future_xy), dtype=bool)) if len(future_xy) else None)
        raters = tuple(RatedTrajectory(xy=_xy(t, f"preference_trajectories[{k}]"), score=float(t.preference_score))
                       for k, t in enumerate(frame.preference_trajectories)
                       if t.HasField("preference_score") and t.preference_score >= 0 and len(t.pos_x))
        jpegs = [images[c] for c in self.cameras]
        return EvalSample(
            sample_id=sample_id, source=self.name, scene=scene, timestamp_us=int(frame.frame.timestamp_micros),
            ego=ego, route_command=INTENT_COMMANDS.get(intent_name, DEFAULT_COMMAND),
            load_images=_image_loader(jpegs, self.cameras, sample_id), future=future, raters=raters,
            image_names=self.cameras, frame="ego", extra=extra)

    @staticmethod
    def _speed(states: e2e.EgoTrajectoryStates, past: np.ndarray, extra: dict[str, Any]) -> float:
        if len(states.vel_x) and len(states.vel_y):
            extra["speed_from"] = "velocity"
            return math.hypot(states.vel_x[-1], states.vel_y[-1])
        extra["speed_from"] = "positions"
        return float(np.hypot(*(past[-1] - past[-2])) * STATE_HZ)

    @staticmethod
    def _accel(states: e2e.EgoTrajectoryStates, extra: dict[str, Any]) -> float:
        if len(states.accel_x):
            extra["accel_from"] = "accel_x"
            return float(states.accel_x[-1])
        extra["accel_from"] = "absent (0.0)"
        return 0.0


def _image_loader(jpegs: list[bytes], cameras: tuple[str, ...], sample_id: str) -> Callable[[], list[ImageArray]]:
    def load() -> list[ImageArray]:
        return [decode_image(data, f"{sample_id}: camera {camera}")
                for data, camera in zip(jpegs, cameras, strict=True)]

    return load
