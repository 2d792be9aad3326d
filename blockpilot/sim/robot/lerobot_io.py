"""Expert episodes to a LeRobot dataset (v3.0 layout) and back, both through LeRobot's own ``LeRobotDataset``.

Written: ``meta/info.json``, ``meta/tasks.parquet``, ``meta/episodes/…parquet``, ``meta/stats.json``,
``data/chunk-000/file-000.parquet`` with the frames as PNG images inside (lossless; videos would need an encoder and
a decoder this machine's torch cannot load, :mod:`.lerobot_lib`), plus ``meta/blockpilot_episodes.json`` (each
episode's seed, simulator task and outcome; LeRobot ignores it). Features, LeRobot's names:

``observation.images.<camera>`` (image), ``observation.state`` (joint positions), ``observation.ee_pose``,
``observation.environment_state``, ``action``, ``next.success`` (bool), and the language instruction as the task.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blockpilot.atomic_io import atomic_dir, atomic_write

from .lerobot_lib import lerobot_dataset_class, video_decoding_available
from .types import RobotDataError, RobotEpisode, RobotSample

IMAGE_PREFIX = "observation.images."
STATE, EE_POSE, ENV_STATE, ACTION, SUCCESS = (
    "observation.state", "observation.ee_pose", "observation.environment_state", "action", "next.success")
EE_POSE_NAMES = ["x", "y", "z", "qw", "qx", "qy", "qz"]
SIDECAR = "meta/blockpilot_episodes.json"


def _features(first: RobotEpisode) -> dict[str, dict[str, Any]]:
    features: dict[str, dict[str, Any]] = {
        IMAGE_PREFIX + name: {"dtype": "image", "shape": tuple(frames.shape[1:]),
                              "names": ["height", "width", "channel"]}
        for name, frames in first.images.items()}
    features[STATE] = {"dtype": "float32", "shape": (len(first.joint_names),), "names": list(first.joint_names)}
    features[EE_POSE] = {"dtype": "float32", "shape": (7,), "names": EE_POSE_NAMES}
    features[ENV_STATE] = {"dtype": "float32", "shape": (first.environment_state.shape[1],), "names": None}
    features[ACTION] = {"dtype": "float32", "shape": (len(first.action_names),), "names": list(first.action_names)}
    features[SUCCESS] = {"dtype": "bool", "shape": (1,), "names": None}
    return features


def _check_alike(episodes: Sequence[RobotEpisode]) -> None:
    if not episodes:
        raise RobotDataError("no episode to write")
    first = episodes[0]

    def layout(ep: RobotEpisode) -> tuple[Any, ...]:
        return (ep.fps, ep.joint_names, ep.action_names, ep.environment_state.shape[1],
                sorted((k, v.shape[1:]) for k, v in ep.images.items()))

    for ep in episodes[1:]:
        if layout(ep) != layout(first):
            raise RobotDataError(f"episode of seed {ep.seed} differs from seed {first.seed} in fps, joints, "
                                 "actions, state size or cameras; one dataset holds one layout")


def write_lerobot_dataset(episodes: Sequence[RobotEpisode], dest: str | Path, *, repo_id: str = "blockpilot/so101",
                          overwrite: bool = False) -> Path:
    """Write ``episodes`` as one LeRobot dataset at ``dest`` with ``LeRobotDataset.create``/``add_frame``/
    ``save_episode``/``finalize``. Built in a staging directory and renamed into place: nothing half-written."""
    _check_alike(episodes)
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise RobotDataError(f"{dest} exists; pass overwrite=True to replace it")
    dataset_class = lerobot_dataset_class()
    with atomic_dir(dest) as staging, warnings.catch_warnings():
        # LeRobot's stats histogram casts the bool next.success column itself and warns that it does
        warnings.filterwarnings("ignore", message="Converting input from bool", category=RuntimeWarning)
        staging.rmdir()  # LeRobotDataset.create makes its root itself and refuses an existing one
        dataset = dataset_class.create(repo_id, fps=episodes[0].fps, features=_features(episodes[0]),
                                       root=staging, robot_type="so101", use_videos=False)
        for ep in episodes:
            for t in range(ep.length):
                frame: dict[str, Any] = {IMAGE_PREFIX + name: frames[t] for name, frames in ep.images.items()}
                frame.update({STATE: ep.joint_state[t], EE_POSE: ep.ee_pose[t], ENV_STATE: ep.environment_state[t],
                              ACTION: ep.actions[t], SUCCESS: np.asarray([ep.success[t]]), "task": ep.instruction})
                dataset.add_frame(frame)
            dataset.save_episode()
        dataset.finalize()
        sidecar = [{"episode_index": i, "seed": ep.seed, "task": ep.task, "length": ep.length,
                    "success": ep.succeeded} for i, ep in enumerate(episodes)]
        atomic_write(staging / SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    return dest


def _read_info(root: Path) -> dict[str, Any]:
    info_path = root / "meta" / "info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RobotDataError(f"{info_path} is missing: {root} is not a LeRobot dataset") from None
    except (OSError, ValueError) as exc:
        raise RobotDataError(f"{info_path} cannot be read: {exc}") from None
    features = info.get("features")
    if not isinstance(features, dict):
        raise RobotDataError(f"{info_path}: no 'features' table")
    for key in (STATE, ACTION):
        if key not in features:
            raise RobotDataError(f"{info_path}: feature {key!r} is missing (has {sorted(features)})")
    videos = sorted(k for k, v in features.items() if isinstance(v, dict) and v.get("dtype") == "video")
    if videos and not video_decoding_available():
        raise RobotDataError(f"{info_path}: features {videos} are videos, which need torchcodec or torchvision "
                             "to decode, and neither loads here")
    for sub in ("meta/tasks.parquet", "meta/episodes", "data"):
        if not (root / sub).exists():
            raise RobotDataError(f"{root / sub} is missing: {root} is not a complete LeRobot dataset")
    return info


def _image(tensor: Any) -> np.ndarray:
    """LeRobot's float CHW in [0, 1] back to the uint8 HWC frame it was written from."""
    array = tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)
    return np.clip(np.rint(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


class LeRobotReplaySource:
    """Every frame of a local LeRobot dataset as a :class:`RobotSample`, read with ``LeRobotDataset``; the target
    chunk is the next ``chunk`` actions of the same episode (LeRobot's ``delta_timestamps``, padded at the end).
    ``cameras``: the recorded cameras a sample holds, in prompt order (default: all, in the dataset's order)."""

    def __init__(self, root: str | Path, *, chunk: int = 8, episodes: Sequence[int] | None = None,
                 cameras: Sequence[str] | None = None) -> None:
        if chunk < 1:
            raise RobotDataError(f"chunk must be at least 1, got {chunk}")
        self.root = Path(root)
        self.info = _read_info(self.root)
        self.fps = int(self.info["fps"])
        self.chunk = chunk
        self.recorded_cameras = tuple(k[len(IMAGE_PREFIX):] for k, v in self.info["features"].items()
                                      if k.startswith(IMAGE_PREFIX) and v.get("dtype") in ("image", "video"))
        self.cameras = self.recorded_cameras if cameras is None else tuple(cameras)
        unknown = [name for name in self.cameras if name not in self.recorded_cameras]
        if unknown or not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise RobotDataError(f"cameras {list(self.cameras)}: {self.root} records "
                                 f"{[IMAGE_PREFIX + c for c in self.recorded_cameras]}; pick from them, each once")
        dataset_class = lerobot_dataset_class()
        deltas = {ACTION: [k / self.fps for k in range(chunk)]}
        try:
            self._dataset = dataset_class(f"local/{self.root.name}", root=self.root,
                                          episodes=None if episodes is None else list(episodes),
                                          delta_timestamps=deltas)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise RobotDataError(f"{self.root}: LeRobot cannot open this dataset: {exc}") from exc

    @property
    def num_episodes(self) -> int:
        return int(self._dataset.num_episodes)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> RobotSample:
        item = self._dataset[index]
        return RobotSample(
            episode_index=int(item["episode_index"]), frame_index=int(item["frame_index"]),
            instruction=str(item["task"]),
            images={name: _image(item[IMAGE_PREFIX + name]) for name in self.cameras},
            state=item[STATE].numpy().astype(np.float32), actions=item[ACTION].numpy().astype(np.float32),
            action_pad=item[f"{ACTION}_is_pad"].numpy().astype(bool),
            ee_pose=item[EE_POSE].numpy().astype(np.float32) if EE_POSE in item else None,
            environment_state=item[ENV_STATE].numpy().astype(np.float32) if ENV_STATE in item else None)

    def __iter__(self) -> Iterator[RobotSample]:
        for index in range(len(self)):
            yield self[index]
