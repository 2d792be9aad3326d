"""What every replay source yields and the evaluator consumes (torch-free).

Coordinates are metres in the *evaluation frame* of the sample's own instant t0: x forward, y left,
origin at the ego reference point (``frame="ego"``) or at the LIDAR_TOP sensor (``frame="lidar"``,
nuScenes only; the axes are turned to forward/left, a fixed rotation of nuScenes' right/forward lidar
axes that leaves every distance and the ST-P3 grid unchanged). Times are seconds after t0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import BlockpilotError
from ..vla.prompt import EgoState

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
ImageArray = npt.NDArray[np.uint8]
FRAMES = ("ego", "lidar")
TURN_THRESHOLD_M = 2.0  # VAD / UniAD: the logged future's lateral offset that makes a turn command


def route_command_from_future(xy: npt.ArrayLike, valid: npt.ArrayLike) -> str:
    """The route command nuScenes-style planners derive from the logged future (VAD, UniAD): the
    last valid point's left offset (ego frame) >= 2 m "turn left", <= -2 m "turn right", else (or
    with no valid point) "go straight"."""
    points, ok = np.asarray(xy, dtype=np.float64), np.asarray(valid, dtype=bool)
    if not ok.any():
        return "go straight"
    left = float(points[np.flatnonzero(ok)[-1], 1])
    return "turn left" if left >= TURN_THRESHOLD_M else "turn right" if left <= -TURN_THRESHOLD_M else "go straight"


class DatasetError(BlockpilotError, ValueError):
    """A source cannot be read at all (missing dataroot, table, index, bag); the message names the file."""


class SampleError(BlockpilotError, ValueError):
    """One sample cannot be used (missing or corrupt image, broken record, non-finite pose); the
    message names the file, record or field. The evaluator records it and goes on."""


def _array(value: Any, shape_tail: tuple[int, ...], what: str, dtype: Any = np.float64) -> Any:
    arr = np.array(value, dtype=dtype)
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
        raise ValueError(f"{what}: expected shape (N, {', '.join(map(str, shape_tail))}), got {arr.shape}"
                         if shape_tail else f"{what}: expected shape (N,), got {arr.shape}")
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Positions at ``times_s`` (strictly increasing, > 0) with a validity flag per point (a future
    that leaves the recording is invalid there; its position is then meaningless)."""

    times_s: FloatArray
    xy: FloatArray
    valid: BoolArray

    def __post_init__(self) -> None:
        times = _array(self.times_s, (), "Trajectory.times_s")
        xy = _array(self.xy, (2,), "Trajectory.xy")
        valid = _array(self.valid, (), "Trajectory.valid", dtype=np.bool_)
        if not (len(times) == len(xy) == len(valid)):
            raise ValueError(f"Trajectory: {len(times)} times, {len(xy)} points, {len(valid)} flags")
        if len(times) and (times[0] <= 0 or np.any(np.diff(times) <= 0)):
            raise ValueError(f"Trajectory.times_s must be positive and increasing, got {times.tolist()}")
        if not np.isfinite(xy[valid]).all():
            raise ValueError("Trajectory.xy holds a non-finite valid point")
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "valid", valid)


@dataclass(frozen=True, eq=False)
class AgentBoxes:
    """Other road users' boxes at future times (normally the ground truth's times): ``boxes[t]`` is
    ``(M_t, 5)`` rows ``x, y, yaw, length, width`` in the evaluation frame at t0; ``kinds[t]`` names
    each row's category (``vehicle``, ``pedestrian``, ...)."""

    times_s: FloatArray
    boxes: tuple[FloatArray, ...]
    kinds: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        times = _array(self.times_s, (), "AgentBoxes.times_s")
        boxes = tuple(_array(b, (5,), f"AgentBoxes.boxes[{i}]") if len(b) else np.zeros((0, 5))
                      for i, b in enumerate(self.boxes))
        if len(boxes) != len(times):
            raise ValueError(f"AgentBoxes: {len(times)} times but {len(boxes)} box arrays")
        kinds = self.kinds or tuple(("agent",) * len(b) for b in boxes)
        if [len(k) for k in kinds] != [len(b) for b in boxes]:
            raise ValueError("AgentBoxes.kinds must name every box")
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "kinds", tuple(tuple(k) for k in kinds))

    def at(self, times_s: Sequence[float], tol: float = 1e-6) -> list[FloatArray] | None:
        """The box arrays at exactly these times, or ``None`` if any time has no boxes."""
        out = []
        for t in times_s:
            hit = np.flatnonzero(np.abs(self.times_s - t) <= tol)
            if not hit.size:
                return None
            out.append(self.boxes[int(hit[0])])
        return out


@dataclass(frozen=True, eq=False)
class RatedTrajectory:
    """A rater-specified future (WOD-E2E): positions at 4 Hz from 0.25 s, and its score (0..10)."""

    xy: FloatArray
    score: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "xy", _array(self.xy, (2,), "RatedTrajectory.xy"))
        if not np.isfinite(self.score):
            raise ValueError(f"RatedTrajectory.score must be finite, got {self.score}")


@dataclass(frozen=True, eq=False)
class EvalSample:
    """One planning instant of a recording, with what the metrics need.

    ``sample_id`` is unique within its source and stable across runs (the JSONL resume key).
    ``load_images`` decodes the camera images in prompt order and raises :class:`SampleError`
    naming the file when one is missing or corrupt. ``future`` is ``None`` where the recording has
    no ground truth (the WOD-E2E test split). ``ego_box_offset_m`` is how far ahead of a trajectory
    point the centre of the ST-P3 ego footprint lies (0.5 m relative to the lidar, as in ST-P3).
    """

    sample_id: str
    source: str
    scene: str
    timestamp_us: int
    ego: EgoState
    route_command: str
    load_images: Callable[[], list[ImageArray]]
    future: Trajectory | None
    agents: AgentBoxes | None = None
    raters: tuple[RatedTrajectory, ...] = ()
    image_names: tuple[str, ...] = ()
    frame: str = "ego"
    ego_box_offset_m: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def init_speed_mps(self) -> float:
        return float(self.ego.speed_mps)


@dataclass(frozen=True)
class SampleFailure:
    """A sample the source could not build. ``kind`` is ``"error"`` (broken data, counted as a
    failure) or ``"skipped"`` (by design, e.g. less than the 2 s of history the prompt needs)."""

    sample_id: str
    source: str
    scene: str
    reason: str
    kind: Literal["error", "skipped"] = "error"


class Source(Protocol):
    """A replay source: iterating yields every sample in a stable order, or a failure in its place."""

    name: str

    def __iter__(self) -> Iterator[EvalSample | SampleFailure]: ...

    def __len__(self) -> int:
        """How many items iteration yields (samples and failures), for the progress bar."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the run header: dataroot, version, frame, cameras, counts."""
        ...
