"""Robot calibration samples for an action-chunk model: frames of a LeRobot dataset as robot observations.

A manipulation model must be calibrated on what it will see on the arm: camera frames, the instruction and the
joint state, with the dataset's next ``steps`` actions as the answer teacher-forced calibration renders
(:func:`blockpilot.calibration.answers.sample_truth_tokens`). The dataset's ``observation.state`` and ``action``
columns are mapped onto the schema's ``state_dims`` and ``dims`` by name, as ``blockpilot eval --source lerobot``
maps them (:func:`blockpilot.eval.robot_eval.map_dims`); a dataset that does not map is refused up front.

Frames are drawn evenly spaced over the whole dataset (index ``round((i + offset) * n / size)``, the offset from
the seed), so every episode and every phase of the task (reach, grasp, lift, place) is represented in proportion;
a frame that does not load is replaced by the next one. Robot sets are read from a local dataset and are not
cached (the manifest says so); their content hash covers ids, images, states and target chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..eval.types import ImageArray
from ..runtime.plan_types import RobotObservation
from .sets import FORMAT_VERSION, CalibrationError, CalibrationSet

ROBOT_SOURCES = ("lerobot",)
FAILURE_EXAMPLES = 5


@dataclass(frozen=True, eq=False)
class RobotCalibrationSample:
    """One dataset frame: its images (dataset camera order), instruction, state (the schema's ``state_dims``) and
    the next ``steps`` actions in the schema's ``dims`` (LeRobot pads past the episode's end by repeating the last)."""

    sample_id: str
    source: str
    images: tuple[ImageArray, ...]
    instruction: str
    state: npt.NDArray[np.float64]
    actions: npt.NDArray[np.float64]

    def observation(self) -> RobotObservation:
        return RobotObservation(images=list(self.images), instruction=self.instruction, state=self.state)


class LeRobotCalibrationSource:
    """A local LeRobot dataset read for ``schema`` (an :class:`~blockpilot.vla.plans.ActionChunkSchema`); ``flag``
    names the option that gave ``root`` in every error."""

    name = "lerobot"
    robot = True

    def __init__(self, root: str | Path, schema: Any, *, flag: str = "--calib-dataroot") -> None:
        from ..eval.robot_eval import ACTION_KEY, RobotDimsError, map_dims, state_mapping
        from ..sim.robot.lerobot_io import LeRobotReplaySource
        from ..sim.robot.types import RobotDataError
        from ..vla.plans import ActionChunkSchema

        if not isinstance(schema, ActionChunkSchema):
            raise CalibrationError(f"{flag} {root}: a LeRobot dataset calibrates an action-chunk model; this model "
                                   f"answers in a {type(schema).__name__} layout")
        self.root, self.schema, self.flag = Path(root), schema, flag
        try:
            self.replay = LeRobotReplaySource(self.root, chunk=schema.steps)
            where = str(self.root / "meta" / "info.json")
            self.state = state_mapping(self.replay.info, schema.state_dims, where=where)
            action_map = map_dims(self.replay.info, ACTION_KEY, schema.dims, where=where)
        except (RobotDataError, RobotDimsError) as exc:
            raise CalibrationError(f"{flag} {root}: not a robot dataset this model can calibrate on: {exc}") from exc
        assert action_map is not None  # an action-chunk schema has dims
        self.action_map = action_map

    def __len__(self) -> int:
        return len(self.replay)

    def describe(self) -> dict[str, Any]:
        return {"format": "lerobot", "dataset": str(self.root.resolve()), "frames": len(self.replay),
                "episodes": self.replay.num_episodes, "cameras": list(self.replay.cameras), "fps": self.replay.fps,
                "chunk": self.schema.steps, "dims": list(self.schema.dims),
                "state_dims": list(self.schema.state_dims)}

    def sample(self, index: int) -> RobotCalibrationSample:
        """Frame ``index`` as a calibration sample (raises what the dataset raises for a bad frame)."""
        from ..eval.robot_eval import sample_state

        item = self.replay[index]
        state = sample_state(item, *self.state)
        return RobotCalibrationSample(
            f"{self.name}/{item.episode_index}/{item.frame_index}", self.name,
            tuple(item.images[c] for c in self.replay.cameras), item.instruction, state,
            item.actions[:, self.action_map].astype(np.float64))


def robot_content_hash(samples: list[RobotCalibrationSample]) -> str:
    """sha256 over ids, instructions, states, target chunks and image bytes, in the given order."""
    digest = hashlib.sha256(f"blockpilot-robot-calibration/v{FORMAT_VERSION}".encode())
    for s in samples:
        parts = [s.sample_id.encode(), s.instruction.encode(), np.ascontiguousarray(s.state, "<f8").tobytes(),
                 np.ascontiguousarray(s.actions, "<f8").tobytes()]
        parts += [np.asarray(i.shape, "<i8").tobytes() + np.ascontiguousarray(i).tobytes() for i in s.images]
        for part in parts:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def build_robot_calibration_set(source: LeRobotCalibrationSource, size: int, seed: int = 0) -> CalibrationSet:
    """Up to ``size`` frames evenly spaced over ``source`` (see the module text)."""
    from ..sim.robot.types import RobotDataError

    total = len(source)
    if total == 0:
        raise CalibrationError(f"{source.flag} {source.root}: the dataset has no frame")
    offset = (int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "little") % 1000) / 1000.0
    wanted = sorted({min(total - 1, int((i + offset) * total / size)) for i in range(min(size, total))})
    samples: list[RobotCalibrationSample] = []
    taken: set[int] = set()
    failures: list[str] = []
    for index in wanted:
        while index < total and index in taken:
            index += 1
        while index < total:
            taken.add(index)
            try:
                samples.append(source.sample(index))
                break
            except (RobotDataError, OSError, ValueError, KeyError) as exc:
                failures.append(f"frame {index}: {exc}")
                index += 1
    if not samples:
        raise CalibrationError(f"{source.flag} {source.root}: no frame loads; first: {failures[:3]}")
    episodes: dict[str, int] = {}
    for s in samples:
        key = "episode " + s.sample_id.split("/")[1]
        episodes[key] = episodes.get(key, 0) + 1
    describe = source.describe()
    key_payload = {"format": FORMAT_VERSION, "source": source.name, "describe": describe, "size": size, "seed": seed}
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "cache_key": hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest(),
        "source": {"name": source.name, "describe": describe},
        "selection": {"size": size, "seed": seed, "order": "frames evenly spaced over the dataset, seeded offset"},
        "items_seen": total, "usable": total - len(failures), "selected": len(samples),
        "strata": {k: {"selected": n} for k, n in sorted(episodes.items())},
        "failures": {"image_error": len(failures)}, "failure_examples": failures[:FAILURE_EXAMPLES],
        "sample_ids": [s.sample_id for s in samples], "content_hash": robot_content_hash(samples),
        "cached": False, "rebuilt_reason": None,
    }
    return CalibrationSet(tuple(samples), manifest)  # type: ignore[arg-type]


def check_calibration_matches(schema: Any, calib: CalibrationSet) -> None:
    """Raise :class:`CalibrationError` when ``calib`` holds driving scenes for an action-chunk model or robot frames
    for a driving one (the message names the option that picks the source)."""
    from ..vla.plans import ActionChunkSchema

    robot_model = isinstance(schema, ActionChunkSchema)
    robot_set = bool(calib.samples) and isinstance(calib.samples[0], RobotCalibrationSample)
    if robot_model == robot_set:
        return
    source = calib.manifest.get("source", {}).get("name") if isinstance(calib.manifest.get("source"), dict) else None
    if robot_model:
        raise CalibrationError(f"--calib-source {source}: this model answers in action chunks "
                               f"({', '.join(schema.dims)}) and must be calibrated on robot observations, not "
                               "driving scenes: pass --calib-source lerobot --calib-dataroot DATASET")
    raise CalibrationError(f"--calib-source {source}: this model plans driving ({type(schema).__name__}); robot "
                           "frames cannot calibrate it: pass a driving source (synthetic, nuscenes, wod, mcap)")
