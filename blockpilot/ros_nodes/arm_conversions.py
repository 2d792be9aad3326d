"""ROS 2 messages to and from what a manipulation planner reads and writes (pure functions, no node).

``sensor_msgs/JointState`` to the state vector in the schema's joint order; an action chunk of joint targets to
``trajectory_msgs/JointTrajectory`` (one point per row, ``1 / rate_hz`` apart); an action chunk of end-effector
deltas to ``geometry_msgs/PoseArray`` waypoints, integrated from the current end-effector pose when one is known
(in its frame) or else from the gripper itself (in the gripper frame). Refusals are
:class:`~blockpilot.ros_nodes.conversions.ConversionError` with the diagnostics ``kind``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .conversions import ConversionError, stamp_ns, time_msg

FloatArray = npt.NDArray[np.float64]
POSITION_DIMS = ("dx", "dy", "dz")
ROTATION_DIMS = ("droll", "dpitch", "dyaw")


def joint_state_vector(msg: Any, names: Sequence[str], topic: str) -> FloatArray:
    """The positions of ``names`` (in that order) from a ``JointState``; every position when ``names`` is empty.
    Raises :class:`ConversionError` (``missing_joint``, ``malformed_joint_state`` or ``nonfinite_joint_state``)."""
    have = [str(n) for n in msg.name]
    positions = np.asarray(msg.position, dtype=np.float64)
    if len(positions) != len(have):
        raise ConversionError(f"{topic}: {len(have)} joint names but {len(positions)} positions",
                              "malformed_joint_state")
    if names:
        index = {n: i for i, n in enumerate(have)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ConversionError(f"{topic}: joint {', '.join(repr(m) for m in missing)} missing from the joint "
                                  f"state (has {', '.join(have) or 'none'}); the model reads {', '.join(names)}",
                                  "missing_joint")
        positions = positions[[index[n] for n in names]]
    if positions.size == 0:
        raise ConversionError(f"{topic}: the joint state holds no position", "malformed_joint_state")
    if not np.isfinite(positions).all():
        bad = [n for n, v in zip(names or have, positions, strict=True) if not math.isfinite(v)]
        raise ConversionError(f"{topic}: non-finite position of {', '.join(bad)}", "nonfinite_joint_state")
    return positions


def _duration(seconds: float) -> Any:
    from builtin_interfaces.msg import Duration

    sec, nanosec = divmod(round(seconds * 1e9), 1_000_000_000)
    return Duration(sec=int(sec), nanosec=int(nanosec))


def trajectory_msg(actions: FloatArray, joint_names: Sequence[str], rate_hz: float, stamp: int,
                   frame_id: str) -> Any:
    """A ``JointTrajectory``: row ``k`` of ``actions`` is the point at ``time_from_start = (k + 1) / rate_hz``."""
    from std_msgs.msg import Header
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    points = [JointTrajectoryPoint(positions=[float(v) for v in row], time_from_start=_duration((k + 1) / rate_hz))
              for k, row in enumerate(np.asarray(actions, dtype=np.float64))]
    return JointTrajectory(header=Header(stamp=time_msg(stamp), frame_id=frame_id),
                           joint_names=list(joint_names), points=points)


def quaternion_from_rpy(roll: float, pitch: float, yaw: float) -> FloatArray:
    """[w, x, y, z] of the rotation roll about x, then pitch about y, then yaw about z (extrinsic)."""
    cr, sr, cp, sp = math.cos(roll / 2), math.sin(roll / 2), math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
    return np.array([cr * cp * cy + sr * sp * sy, sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy])


def quaternion_multiply(a: FloatArray, b: FloatArray) -> FloatArray:
    """The rotation ``a`` after ``b`` ([w, x, y, z] each)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw])


def ee_waypoints(actions: FloatArray, dims: Sequence[str], scale: float,
                 start: tuple[FloatArray, FloatArray] | None = None) -> tuple[FloatArray, FloatArray]:
    """Positions ``(K, 3)`` and quaternions ``(K, 4)`` [w, x, y, z] after each row of end-effector deltas.

    The deltas (``dx, dy, dz`` and, where the schema has them, ``droll, dpitch, dyaw``, each times ``scale``) add
    up row by row in the frame they are given in; ``start`` (position, quaternion) is the pose they start from,
    the identity (the gripper itself) when ``None``. Other dims (the gripper) are not poses and are left out."""
    rows = np.asarray(actions, dtype=np.float64)
    column = {d: i for i, d in enumerate(dims)}
    if not set(POSITION_DIMS) <= set(column):
        raise ConversionError(f"an ee-delta chunk needs dims {', '.join(POSITION_DIMS)}; the schema has "
                              f"{', '.join(dims)}", "bad_observation")
    moves = np.cumsum(rows[:, [column[d] for d in POSITION_DIMS]] * scale, axis=0)
    turns = np.zeros_like(moves)
    if set(ROTATION_DIMS) <= set(column):
        turns = np.cumsum(rows[:, [column[d] for d in ROTATION_DIMS]] * scale, axis=0)
    position, rotation = start if start is not None else (np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0]))
    quats = np.array([quaternion_multiply(quaternion_from_rpy(*turn), rotation) for turn in turns])
    return np.asarray(position, dtype=np.float64) + moves, quats


def pose_of(msg: Any, topic: str) -> tuple[FloatArray, FloatArray]:
    """Position and quaternion [w, x, y, z] of a ``PoseStamped``; :class:`ConversionError` if not finite."""
    p, q = msg.pose.position, msg.pose.orientation
    position, quat = np.array([p.x, p.y, p.z], dtype=np.float64), np.array([q.w, q.x, q.y, q.z], dtype=np.float64)
    norm = float(np.linalg.norm(quat))
    if not (np.isfinite(position).all() and np.isfinite(quat).all()) or norm < 1e-9:
        raise ConversionError(f"{topic}: the end-effector pose is not finite or its quaternion is zero",
                              "bad_observation")
    return position, quat / norm


def pose_array_msg(positions: FloatArray, quats: FloatArray, stamp: int, frame_id: str) -> Any:
    from geometry_msgs.msg import Point, Pose, PoseArray, Quaternion
    from std_msgs.msg import Header

    poses = [Pose(position=Point(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                  orientation=Quaternion(w=float(q[0]), x=float(q[1]), y=float(q[2]), z=float(q[3])))
             for p, q in zip(positions, quats, strict=True)]
    return PoseArray(header=Header(stamp=time_msg(stamp), frame_id=frame_id), poses=poses)


def age_ns(reference: int, msg: Any) -> int:
    """``|reference - stamp of msg|`` in nanoseconds."""
    return abs(reference - stamp_ns(msg.header.stamp))
