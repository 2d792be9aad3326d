"""Generated scenes as a calibration source: seeds from :data:`CALIBRATION_SEED_BASE`, disjoint from
training (below 1,000,000) and the held-out evaluation scenes (1,000,000 and up)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..eval.types import EvalSample, ImageArray, SampleFailure, Trajectory
from ..sim.cameras import FRONT_CAMERA
from ..sim.generator import generate_scene
from ..sim.samples import FUTURE_TIMES_S, Keyframe, keyframes
from ..vla.prompt import EgoState
from .sets import CALIBRATION_SEED_BASE


class SyntheticCalibrationSource:
    """Generated scenes as a replay source: every ``keyframe_stride``-th 2 Hz keyframe (with 2 s of
    history) of the scenes seeded ``first_seed ..``, front camera rendered on ``load_images()``."""

    name = "synthetic"

    def __init__(self, num_scenes: int, first_seed: int = CALIBRATION_SEED_BASE, *, duration_s: float = 20.0,
                 keyframe_stride: int = 2) -> None:
        if num_scenes < 1 or keyframe_stride < 1 or duration_s <= 0 or first_seed < CALIBRATION_SEED_BASE:
            raise ValueError(f"num_scenes ({num_scenes}), keyframe_stride ({keyframe_stride}), duration_s "
                             f"({duration_s}) must be positive, first_seed ({first_seed}) >= {CALIBRATION_SEED_BASE} "
                             "(training and held-out evaluation scenes use lower seeds)")
        self.num_scenes, self.first_seed = num_scenes, first_seed
        self.duration_s, self.keyframe_stride = duration_s, keyframe_stride

    def _frames(self) -> Iterator[tuple[int, Keyframe]]:
        for seed in range(self.first_seed, self.first_seed + self.num_scenes):
            for frame in keyframes(generate_scene(seed, duration_s=self.duration_s))[::self.keyframe_stride]:
                yield seed, frame

    def __len__(self) -> int:  # scene generation is cheap next to rendering, which this skips
        return sum(1 for _ in self._frames())

    def describe(self) -> dict[str, Any]:
        return {"generator": "blockpilot.sim", "first_seed": self.first_seed, "num_scenes": self.num_scenes,
                "duration_s": self.duration_s, "keyframe_stride": self.keyframe_stride,
                "cameras": [FRONT_CAMERA.name], "frame": "ego"}

    def __iter__(self) -> Iterator[EvalSample | SampleFailure]:
        times = np.asarray(FUTURE_TIMES_S)
        for seed, f in self._frames():  # the ego state as blockpilot.eval.synthetic.observation builds it
            yield EvalSample(
                sample_id=f"{self.name}/{seed}/{f.step}", source=self.name, scene=f.scene_name,
                timestamp_us=round(f.time_s * 1e6), route_command=f.route_command,
                ego=EgoState(past_waypoints=f.past_xy, speed_mps=float(f.speed), accel_mps2=float(f.accel)),
                load_images=functools.partial(_front_image, f),  # rendered only when selected
                future=Trajectory(times_s=times, xy=f.future_xy, valid=f.time_s + times <= f.scene.duration_s + 1e-6),
                image_names=(FRONT_CAMERA.name,), extra={"seed": seed, "step": f.step})


def _front_image(frame: Keyframe) -> list[ImageArray]:
    return list(frame.images().values())


def synthetic_calibration_source(num_scenes: int, first_seed: int = CALIBRATION_SEED_BASE, *,
                                 duration_s: float = 20.0, keyframe_stride: int = 2) -> SyntheticCalibrationSource:
    """Generated calibration scenes, disjoint from the training and held-out evaluation seeds."""
    return SyntheticCalibrationSource(num_scenes, first_seed, duration_s=duration_s, keyframe_stride=keyframe_stride)
