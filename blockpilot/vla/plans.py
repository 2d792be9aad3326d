"""Typed plans and the answer schemas that lay them out: driving (Fast-dDrive), robot action and action chunk.

A plan schema is a frozen config (horizon, rate, number widths, vocabularies) that builds its
:class:`SchemaLayout` once and converts between its typed plan and the layout's section values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from .json_schema import MAX_TOKENS_KEY, compile_schema
from .schema import FixedNumber, SchemaError, SchemaLayout, exact_mapping
from .slots import check_unique

PlanT = TypeVar("PlanT")

CRITICAL_OBJECT_KEYS = (
    "nearby_vehicle", "pedestrian", "cyclist", "construction", "traffic_element", "weather_condition",
    "road_hazard", "emergency_vehicle", "animal", "special_vehicle", "conflicting_vehicle",
    "door_opening_vehicle",
)
LONGITUDINAL_BEHAVIOURS = ("accelerate", "keep_speed", "decelerate", "stop")
LATERAL_BEHAVIOURS = ("straight", "left_turn", "right_turn", "left_lane_change", "right_lane_change")
GRIPPER_STATES = ("open", "close")
# SO-101 (LeRobot's arm): five joints and the gripper, in the order LeRobot names its motors.
SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
EE_DELTA_DIMS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
# The SO-101 MuJoCo tasks' action (``lerobot-env-so101``): a Cartesian step of the gripper point and the grasp.
SO101_EE_DIMS = ("dx", "dy", "dz", "gripper")
# The block's position minus the gripper point's, metres (``vla/robot_state.py`` composes them from the simulator's
# ``environment_state`` and ``ee_pose``, as LeRobot's ``observation.environment_state``).
BLOCK_OFFSET_DIMS = ("block_dx", "block_dy", "block_dz")
ACTION_KINDS = ("joint_targets", "ee_delta")
FLAG_YES, FLAG_NO = "yes", "no"  # how the driving layout spells a critical-object flag
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


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


def _number_schema(int_digits: int, frac_digits: int) -> dict[str, Any]:
    """A fixed-width number of ``int_digits``.``frac_digits`` digits: the full range the width can write."""
    bound = float("9" * int_digits + ("." + "9" * frac_digits if frac_digits else ""))
    return {"type": "number", "minimum": -bound, "maximum": bound, "multipleOf": float(f"1e-{frac_digits}")}


def _fixed_array(length: int, items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "minItems": length, "maxItems": length, "items": items}


def _object(properties: dict[str, Any], *, dialect: bool = False, title: str | None = None) -> dict[str, Any]:
    head: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT, "title": title} if dialect else {}
    return {**head, "type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _shaped(value: object, shape: tuple[int, int], what: str) -> npt.NDArray[np.float64]:
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{what}: expected a {shape} array of numbers") from exc
    if points.shape != shape:
        raise SchemaError(f"{what}: expected shape {shape}, got {points.shape}")
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
        FixedNumber(self.int_digits, self.frac_digits)  # validates the widths
        check_unique(list(self.critical_object_keys), "DrivingSchema.critical_object_keys")
        object.__setattr__(self, "layout", compile_schema(self.json_schema(), "DrivingSchema").layout)

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

    def json_schema(self) -> dict[str, Any]:
        """The answer layout as a JSON Schema document (what :func:`compile_schema` builds the layout from)."""
        flags = {"enum": [FLAG_YES, FLAG_NO]}
        point = _fixed_array(2, _number_schema(self.int_digits, self.frac_digits))
        return _object({
            "critical_objects": _object({k: dict(flags) for k in self.critical_object_keys}),
            "explanation": {"type": "string", MAX_TOKENS_KEY: self.explanation_tokens},
            "future_meta_behavior": _object({
                "longitudinal": {"enum": list(self.longitudinal_options)},
                "lateral": {"enum": list(self.lateral_options)},
            }),
            "trajectory": _fixed_array(self.num_waypoints, point),
        }, dialect=True, title="Fast-dDrive driving answer")

    def sections_from_plan(self, plan: DrivingPlan) -> dict[str, object]:
        flags = exact_mapping(plan.critical_objects, self.critical_object_keys, "critical_objects")
        for key, value in flags.items():
            if not isinstance(value, (bool, np.bool_)):
                raise SchemaError(f"critical_objects.{key}: expected a bool, got {value!r}")
        return {
            "critical_objects": {k: FLAG_YES if flags[k] else FLAG_NO for k in self.critical_object_keys},
            "explanation": plan.explanation,
            "future_meta_behavior": {"longitudinal": plan.longitudinal, "lateral": plan.lateral},
            "trajectory": _shaped(plan.waypoints, (self.num_waypoints, 2), "trajectory"),
        }

    def plan_from_sections(self, sections: Mapping[str, object]) -> DrivingPlan:
        meta = sections["future_meta_behavior"]
        flags = sections["critical_objects"]
        assert isinstance(meta, dict) and isinstance(flags, dict)  # built by this layout's parts
        return DrivingPlan(
            waypoints=np.asarray(sections["trajectory"], dtype=np.float64),
            longitudinal=str(meta["longitudinal"]),
            lateral=str(meta["lateral"]),
            critical_objects={k: v == FLAG_YES for k, v in flags.items()},
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
        FixedNumber(self.int_digits, self.frac_digits)  # validates the widths
        object.__setattr__(self, "layout", compile_schema(self.json_schema(), "RobotActionSchema").layout)

    def json_schema(self) -> dict[str, Any]:
        """The answer layout as a JSON Schema document (what :func:`compile_schema` builds the layout from)."""
        point = _fixed_array(3, _number_schema(self.int_digits, self.frac_digits))
        return _object({
            "subtask": {"type": "string", MAX_TOKENS_KEY: self.subtask_tokens},
            "gripper": {"enum": list(self.gripper_options)},
            "waypoints": _fixed_array(self.num_waypoints, point),
        }, dialect=True, title="Robot action answer")

    def sections_from_plan(self, plan: RobotActionPlan) -> dict[str, object]:
        return {"subtask": plan.subtask, "gripper": plan.gripper,
                "waypoints": _shaped(plan.waypoints, (self.num_waypoints, 3), "waypoints")}

    def plan_from_sections(self, sections: Mapping[str, object]) -> RobotActionPlan:
        return RobotActionPlan(
            subtask=str(sections["subtask"]),
            gripper=str(sections["gripper"]),
            waypoints=np.asarray(sections["waypoints"], dtype=np.float64),
        )


@dataclass(frozen=True, eq=False)
class ActionChunkPlan:
    """An action chunk: ``actions`` ``(steps, dims)``, one row per control step, columns named by ``dims``."""

    actions: npt.NDArray[np.float64]
    dims: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "actions", _points(self.actions, len(self.dims), "ActionChunkPlan.actions"))


@dataclass(frozen=True, slots=True)
class ActionChunkSchema:
    """A manipulation answer that is only an action chunk: ``steps`` rows of ``len(dims)`` fixed-width numbers.

    ``action`` says what a row is: ``joint_targets`` (absolute joint positions, radians, gripper included) or
    ``ee_delta`` (end-effector delta pose: metres and radians, then the gripper, 0 open .. 1 closed). Rows are
    ``1 / rate_hz`` apart. ``state_dims`` names the proprioceptive values the prompt carries (empty: any
    number). The answer is ``{"actions": [[...], ...]}``, so rollouts sample the whole chunk.
    """

    steps: int = 8
    dims: tuple[str, ...] = EE_DELTA_DIMS
    action: str = "ee_delta"
    rate_hz: float = 30.0
    int_digits: int = 1
    frac_digits: int = 3
    state_dims: tuple[str, ...] = ()
    layout: SchemaLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 64:
            raise SchemaError(f"ActionChunkSchema.steps must be 1..64, got {self.steps!r}")
        if not self.dims:
            raise SchemaError("ActionChunkSchema.dims needs at least one action dimension")
        check_unique(list(self.dims), "ActionChunkSchema.dims")
        check_unique(list(self.state_dims), "ActionChunkSchema.state_dims")
        if self.action not in ACTION_KINDS:
            raise SchemaError(f"ActionChunkSchema.action must be one of {ACTION_KINDS}, got {self.action!r}")
        if not isinstance(self.rate_hz, (int, float)) or not self.rate_hz > 0:
            raise SchemaError(f"ActionChunkSchema.rate_hz must be positive, got {self.rate_hz}")
        FixedNumber(self.int_digits, self.frac_digits)  # validates the widths
        object.__setattr__(self, "layout", compile_schema(self.json_schema(), "ActionChunkSchema").layout)

    @classmethod
    def so101_joints(cls) -> ActionChunkSchema:
        """SO-101 joint targets: 8 steps of 5 joints + gripper, radians, at 30 Hz; the state is the same 6 joints."""
        return cls(steps=8, dims=SO101_JOINTS, action="joint_targets", state_dims=SO101_JOINTS)

    @classmethod
    def ee_delta(cls) -> ActionChunkSchema:
        """End-effector deltas: 8 steps of dx, dy, dz, droll, dpitch, dyaw, gripper at 30 Hz."""
        return cls(steps=8, dims=EE_DELTA_DIMS, action="ee_delta")

    @classmethod
    def so101_ee(cls) -> ActionChunkSchema:
        """The SO-101 simulator's own action: 8 steps of dx, dy, dz in [-1, 1] (the environment scales them by
        its ``action_scale``, 0.025 m by default) and the gripper command (the environment's convention: 0 closed
        .. 1 open), at its 10 Hz; the state is the six joint positions."""
        return cls(steps=8, dims=SO101_EE_DIMS, action="ee_delta", rate_hz=10.0, frac_digits=2,
                   state_dims=SO101_JOINTS)

    @classmethod
    def so101_ee_block(cls) -> ActionChunkSchema:
        """:meth:`so101_ee` whose state also carries the block's offset from the gripper point (``block_dx,
        block_dy, block_dz``, metres) after the six joints: privileged simulator state, as LeRobot's
        ``observation.environment_state``."""
        return cls(steps=8, dims=SO101_EE_DIMS, action="ee_delta", rate_hz=10.0, frac_digits=2,
                   state_dims=SO101_JOINTS + BLOCK_OFFSET_DIMS)

    @property
    def number(self) -> FixedNumber:
        return FixedNumber(self.int_digits, self.frac_digits)

    def json_schema(self) -> dict[str, Any]:
        """The answer layout as a JSON Schema document (what :func:`compile_schema` builds the layout from)."""
        row = _fixed_array(len(self.dims), _number_schema(self.int_digits, self.frac_digits))
        return _object({"actions": _fixed_array(self.steps, row)}, dialect=True,
                       title=f"Action chunk ({self.action}: {', '.join(self.dims)})")

    def sections_from_plan(self, plan: ActionChunkPlan) -> dict[str, object]:
        if tuple(plan.dims) != self.dims:
            raise SchemaError(f"actions: the plan's dims {list(plan.dims)} are not the schema's {list(self.dims)}")
        return {"actions": _shaped(plan.actions, (self.steps, len(self.dims)), "actions")}

    def plan_from_sections(self, sections: Mapping[str, object]) -> ActionChunkPlan:
        return ActionChunkPlan(np.asarray(sections["actions"], dtype=np.float64), self.dims)


Plan = DrivingPlan | RobotActionPlan | ActionChunkPlan

DRIVING_PRESETS: dict[str, DrivingSchema] = {
    "nuscenes": DrivingSchema.nuscenes(),
    "wod_e2e": DrivingSchema.wod_e2e(),
}


def render_plan(schema: PlanSchema[PlanT], plan: PlanT) -> str:
    """The canonical answer text of ``plan`` (no padding tokens); raises :class:`SchemaError`."""
    return schema.layout.render(schema.sections_from_plan(plan))
