"""The synthetic world's data model, shared by the generator, the renderer and the format writers.

Everything is in a flat world frame (metres, x east, y north, yaw counter-clockwise from +x,
radians) sampled at a fixed ``dt``. Ego-frame quantities (x forward, y left) are derived with
:func:`blockpilot.geometry.to_ego_frame`. All of it is synthetic and labelled so wherever it is
written out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ROUTE_COMMANDS = ("turn left", "go straight", "turn right")
AGENT_KINDS = ("vehicle", "pedestrian", "cyclist")


@dataclass(frozen=True, eq=False)
class Track:
    """A state per time step: columns x, y, yaw, speed (m/s), accel (m/s²); shape (T, 5)."""

    states: FloatArray

    def __post_init__(self) -> None:
        arr = np.asarray(self.states, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 5 or not np.isfinite(arr).all():
            raise ValueError(f"Track.states must be a finite (T, 5) array, got shape {arr.shape}")
        object.__setattr__(self, "states", arr)

    @property
    def xy(self) -> FloatArray:
        return self.states[:, :2]

    @property
    def yaw(self) -> FloatArray:
        return self.states[:, 2]

    @property
    def speed(self) -> FloatArray:
        return self.states[:, 3]

    @property
    def accel(self) -> FloatArray:
        return self.states[:, 4]


@dataclass(frozen=True, eq=False)
class Agent:
    """Another road user with its box size (length, width, height in metres) and track."""

    agent_id: int
    kind: str
    size: tuple[float, float, float]
    track: Track

    def __post_init__(self) -> None:
        if self.kind not in AGENT_KINDS:
            raise ValueError(f"Agent.kind must be one of {AGENT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True, eq=False)
class Road:
    """The lane the ego follows: a centreline polyline (N, 2) with lane width and speed limit;
    ``lanes`` holds the centrelines of every drivable lane (the ego's first) for rendering/maps."""

    centerline: FloatArray
    lane_width: float
    speed_limit: float
    lanes: tuple[FloatArray, ...] = ()
    stop_line_s: float | None = None  # arc length along the ego lane of a stop line, if any
    # Map extras (all optional): junction areas and pedestrian crossings as (4, 2) corner polygons,
    # and the speed limits along the ego lane as (arc length where it starts, limit m/s), ascending.
    junctions: tuple[FloatArray, ...] = ()
    crosswalks: tuple[FloatArray, ...] = ()
    speed_limits: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, eq=False)
class Scene:
    """One seeded scenario: ego and agents sampled every ``dt`` seconds, a road, a route command."""

    seed: int
    name: str
    dt: float
    ego: Track
    agents: tuple[Agent, ...]
    road: Road
    route_command: str
    ego_size: tuple[float, float, float] = (4.084, 1.85, 1.56)
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.route_command not in ROUTE_COMMANDS:
            raise ValueError(f"Scene.route_command must be one of {ROUTE_COMMANDS}, got {self.route_command!r}")

    @property
    def num_steps(self) -> int:
        return int(self.ego.states.shape[0])

    @property
    def duration_s(self) -> float:
        return (self.num_steps - 1) * self.dt

    def step_at(self, t: float) -> int:
        i = round(t / self.dt)
        if not 0 <= i < self.num_steps:
            raise ValueError(f"time {t:.2f} s outside scene {self.name} (0..{self.duration_s:.2f} s)")
        return i
