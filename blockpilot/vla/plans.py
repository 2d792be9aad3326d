"""Typed plans and the two answer schemas that lay them out: driving (Fast-dDrive) and robot action.

A plan schema is a frozen config (horizon, rate, number widths, vocabularies) that builds its
:class:`SchemaLayout` once and converts between its typed plan and the layout's section values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from .schema import (
    Categorical,
    FixedNumber,
    FlagGroup,
    FreeText,
    Record,
    SchemaError,
    SchemaLayout,
    Section,
    WaypointList,
)

PlanT = TypeVar("PlanT")

CRITICAL_OBJECT_KEYS = (
    "nearby_vehicle", "pedestrian", "cyclist", "construction", "traffic_element", "weather_condition",
    "road_hazard", "emergency_vehicle", "animal", "special_vehicle", "conflicting_vehicle",
    "door_opening_vehicle",
)
LONGITUDINAL_BEHAVIOURS = ("accelerate", "keep_speed", "decelerate", "stop")
LATERAL_BEHAVIOURS = ("straight", "left_turn", "right_turn", "left_lane_change", "right_lane_change")
GRIPPER_STATES = ("open", "close")


class PlanSchema(Protocol[PlanT]):
    """What the scaffold and the parser need from a schema: its layout and the plan conversions."""

    @property
    def layout(self) -> SchemaLayout: ...

    def sections_from_plan(self, plan: PlanT) -> dict[str, object]: ...

    def plan_from_sections(self, sections: Mapping[str, object]) -> PlanT: ...


def _points(value: object, dims: int, what: str) -> npt.NDArray[np.float64]:
    try:
        points = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{what}: expected an (N, {dims}) array of numbers") from exc
    if points.ndim != 2 or points.shape[1] != dims or points.shape[0] < 1:
        raise SchemaError(f"{what}: expected shape (N, {dims}) with N >= 1, got {points.shape}")
    points.flags.writeable = False
    return points


@dataclass(frozen=True, eq=False)
class DrivingPlan:
    """A driving answer: ``waypoints`` (N, 2) in metres in the ego frame (x forward, y left)."""

    waypoints: npt.NDArray[np.float64]
    longitudinal: str
    lateral: str
    critical_objects: Mapping[str, bool]
    explanation: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "waypoints", _points(self.waypoints, 2, "DrivingPlan.waypoints"))
        object.__setattr__(self, "critical_objects", dict(self.critical_objects))


@dataclass(frozen=True, eq=False)
class RobotActionPlan:
    """A manipulation answer: ``waypoints`` (K, 3) end-effector positions x, y, z in metres."""

    subtask: str
    gripper: str
    waypoints: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        object.__setattr__(self, "waypoints", _points(self.waypoints, 3, "RobotActionPlan.waypoints"))


@dataclass(frozen=True, slots=True)
class DrivingSchema:
    """Fast-dDrive answer layout: critical objects, explanation, meta behaviour, then the trajectory.

    ``num_waypoints`` points sampled at ``rate_hz`` cover ``horizon_s``; each coordinate is a
    fixed-width signed decimal with ``int_digits`` / ``frac_digits`` digits.
    """

    num_waypoints: int = 6
    rate_hz: float = 2.0
    int_digits: int = 2
    frac_digits: int = 2
    explanation_tokens: int = 48
    critical_object_keys: tuple[str, ...] = CRITICAL_OBJECT_KEYS
    longitudinal_options: tuple[str, ...] = LONGITUDINAL_BEHAVIOURS
    lateral_options: tuple[str, ...] = LATERAL_BEHAVIOURS
    layout: SchemaLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rate_hz, (int, float)) or not self.rate_hz > 0:
            raise SchemaError(f"DrivingSchema.rate_hz must be positive, got {self.rate_hz}")
        layout = SchemaLayout((
            Section("critical_objects", FlagGroup(tuple(self.critical_object_keys))),
            Section("explanation", FreeText(self.explanation_tokens)),
            Section("future_meta_behavior", Record((
                ("longitudinal", Categorical(tuple(self.longitudinal_options))),
                ("lateral", Categorical(tuple(self.lateral_options))),
            ))),
            Section("trajectory", WaypointList(self.num_waypoints, 2, FixedNumber(self.int_digits, self.frac_digits))),
        ))
        object.__setattr__(self, "layout", layout)

    @classmethod
    def nuscenes(cls) -> DrivingSchema:
        """nuScenes planning: 6 points at 2 Hz over 3 s."""
        return cls(num_waypoints=6, rate_hz=2.0)

    @classmethod
    def wod_e2e(cls) -> DrivingSchema:
        """Waymo Open Dataset end-to-end driving: 20 points at 4 Hz over 5 s (three integer digits: >100 m)."""
        return cls(num_waypoints=20, rate_hz=4.0, int_digits=3)

    @property
    def horizon_s(self) -> float:
        return self.num_waypoints / self.rate_hz

    @property
    def waypoint_times_s(self) -> npt.NDArray[np.float64]:
        return np.arange(1, self.num_waypoints + 1, dtype=np.float64) / self.rate_hz

    def sections_from_plan(self, plan: DrivingPlan) -> dict[str, object]:
        return {
            "critical_objects": plan.critical_objects,
            "explanation": plan.explanation,
            "future_meta_behavior": {"longitudinal": plan.longitudinal, "lateral": plan.lateral},
            "trajectory": plan.waypoints,
        }

    def plan_from_sections(self, sections: Mapping[str, object]) -> DrivingPlan:
        meta = sections["future_meta_behavior"]
        flags = sections["critical_objects"]
        assert isinstance(meta, dict) and isinstance(flags, dict)  # built by this layout's parts
        return DrivingPlan(
            waypoints=np.asarray(sections["trajectory"], dtype=np.float64),
            longitudinal=str(meta["longitudinal"]),
            lateral=str(meta["lateral"]),
            critical_objects=flags,
            explanation=str(sections["explanation"]),
        )


@dataclass(frozen=True, slots=True)
class RobotActionSchema:
    """Manipulation answer layout: the current subtask, the gripper command, then K xyz waypoints."""

    num_waypoints: int = 8
    int_digits: int = 1
    frac_digits: int = 3
    subtask_tokens: int = 24
    gripper_options: tuple[str, ...] = GRIPPER_STATES
    layout: SchemaLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layout = SchemaLayout((
            Section("subtask", FreeText(self.subtask_tokens)),
            Section("gripper", Categorical(tuple(self.gripper_options))),
            Section("waypoints", WaypointList(self.num_waypoints, 3, FixedNumber(self.int_digits, self.frac_digits))),
        ))
        object.__setattr__(self, "layout", layout)

    def sections_from_plan(self, plan: RobotActionPlan) -> dict[str, object]:
        return {"subtask": plan.subtask, "gripper": plan.gripper, "waypoints": plan.waypoints}

    def plan_from_sections(self, sections: Mapping[str, object]) -> RobotActionPlan:
        return RobotActionPlan(
            subtask=str(sections["subtask"]),
            gripper=str(sections["gripper"]),
            waypoints=np.asarray(sections["waypoints"], dtype=np.float64),
        )


Plan = DrivingPlan | RobotActionPlan

DRIVING_PRESETS: dict[str, DrivingSchema] = {
    "nuscenes": DrivingSchema.nuscenes(),
    "wod_e2e": DrivingSchema.wod_e2e(),
}


def render_plan(schema: PlanSchema[PlanT], plan: PlanT) -> str:
    """The canonical answer text of ``plan`` (no padding tokens); raises :class:`SchemaError`."""
    return schema.layout.render(schema.sections_from_plan(plan))
