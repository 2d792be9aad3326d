"""Answers for teacher-forced calibration, read off a replay source's ground truth (torch-free).

An action-chunk answer is the recorded next ``steps`` actions themselves (a robot calibration sample's target
chunk, :mod:`blockpilot.calibration.robot`), clipped to the width the schema writes.

A driving answer needs every section of the schema; a recording only gives the future trajectory.
The trajectory is the logged future resampled at the schema's waypoint times (from the ego at the
origin at time 0); the meta behaviour follows from it with the training labeller's thresholds
(:class:`~blockpilot.train.labels.LabelRules`: speed over the last waypoint interval against the
ego speed now, heading of the last interval, sideways offset for a lane change); no critical object
is flagged and the explanation is the labeller's template for a clear road. That is a plausible
answer in the schema's exact token layout, which is what calibration needs: the activations of the
answer's structure, numbers and words, not a correct label.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..eval.types import Trajectory
from ..train.labels import LabelRules, explanation, lateral_label, longitudinal_label
from ..vla.plans import ActionChunkPlan, ActionChunkSchema, DrivingPlan, DrivingSchema
from ..vla.slots import SchemaError

TokenIds = npt.NDArray[np.int64]


def resample_future(future: Trajectory, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
    """The future's positions at ``times_s`` (linear between valid points, the ego at the origin at 0 s);
    ``None`` when a time lies past the last valid point (the recording ends first)."""
    valid = np.asarray(future.valid, dtype=bool)
    if not valid.any():
        return None
    t = np.concatenate(([0.0], np.asarray(future.times_s, dtype=np.float64)[valid]))
    xy = np.concatenate((np.zeros((1, 2)), np.asarray(future.xy, dtype=np.float64)[valid]))
    if float(times_s[-1]) > float(t[-1]) + 1e-6:
        return None
    return np.column_stack([np.interp(times_s, t, xy[:, 0]), np.interp(times_s, t, xy[:, 1])])


def _option(label: str, options: tuple[str, ...]) -> str:
    return label if label in options else options[0]


def truth_plan(future: Trajectory | None, speed_mps: float, schema: DrivingSchema,
               rules: LabelRules | None = None) -> DrivingPlan | None:
    """The driving answer of a ground-truth ``future`` (see the module text); ``None`` without one that
    covers the schema's horizon."""
    if future is None:
        return None
    rules = rules or LabelRules()
    times = schema.waypoint_times_s
    points = resample_future(future, times)
    if points is None or not np.isfinite(points).all():
        return None
    limit = 10.0 ** schema.int_digits - 10.0 ** -schema.frac_digits
    points = np.clip(points, -limit, limit)
    track = np.concatenate((np.zeros((1, 2)), points))
    dt = float(times[0])
    last = track[-1] - track[-2]
    speed_end = float(np.linalg.norm(last)) / dt
    heading = float(np.arctan2(last[1], last[0])) if speed_end > rules.stop_speed else 0.0
    longitudinal = _option(longitudinal_label(float(speed_mps), speed_end, rules), schema.longitudinal_options)
    lateral = _option(lateral_label(heading, float(track[-1, 1]), rules), schema.lateral_options)
    return DrivingPlan(waypoints=points, longitudinal=longitudinal, lateral=lateral,
                       critical_objects=dict.fromkeys(schema.critical_object_keys, False),
                       explanation=explanation(None, longitudinal, lateral))


def truth_tokens(scaffold: Any, future: Trajectory | None, speed_mps: float) -> TokenIds | None:
    """The scaffold's full answer row for the ground truth, or ``None`` where there is none to render
    (no future, a future shorter than the horizon, a non-driving schema, a value that does not fit)."""
    schema = getattr(scaffold, "schema", None)
    if not isinstance(schema, DrivingSchema):
        return None
    plan = truth_plan(future, speed_mps, schema)
    if plan is None:
        return None
    try:
        ids: TokenIds = np.asarray(scaffold.encode_plan(plan), dtype=np.int64)
    except SchemaError:
        return None
    return ids


def chunk_tokens(scaffold: Any, actions: Any) -> TokenIds | None:
    """The scaffold's answer row for a recorded action chunk (``(steps, dims)``, clipped to the schema's number
    width); ``None`` for a non-chunk schema or a chunk of another shape or with a non-finite value."""
    schema = getattr(scaffold, "schema", None)
    if not isinstance(schema, ActionChunkSchema):
        return None
    chunk = np.asarray(actions, dtype=np.float64)
    if chunk.shape != (schema.steps, len(schema.dims)) or not np.isfinite(chunk).all():
        return None
    limit = 10.0 ** schema.int_digits - 10.0 ** -schema.frac_digits
    rounded = np.round(np.clip(chunk, -limit, limit), schema.frac_digits).astype(np.float64)
    plan = ActionChunkPlan(rounded, schema.dims)
    try:
        ids: TokenIds = np.asarray(scaffold.encode_plan(plan), dtype=np.int64)
    except SchemaError:
        return None
    return ids


def sample_truth_tokens(scaffold: Any, sample: Any) -> TokenIds | None:
    """The ground-truth answer row of a calibration sample: a robot sample's target chunk (:func:`chunk_tokens`),
    a driving sample's future (:func:`truth_tokens`); ``None`` where it has none the schema can render."""
    actions = getattr(sample, "actions", None)
    if actions is not None:
        return chunk_tokens(scaffold, actions)
    return truth_tokens(scaffold, sample.future, sample.ego.speed_mps)
