"""The robot prompt's state vector, composed by name from the values an arm or a simulator reports.

An :class:`~blockpilot.vla.plans.ActionChunkSchema` names its state dims (``state_dims``). A dim is either a joint
position, looked up by name among the joints, or one of the :data:`DERIVED_STATE_DIMS`, computed from the
simulator's ``environment_state`` (LeRobot's ``observation.environment_state``: the block position first) and the
end-effector pose (``observation.ee_pose``: x, y, z, then the orientation), in metres:

- ``block_dx``, ``block_dy``, ``block_dz``: the block's position minus the gripper point's (for the SO-101
  ``reach_close`` task the ``gripperframe`` site, the point the expert and the environment's IK steer);
- ``block_x``, ``block_y``, ``block_z`` and ``ee_x``, ``ee_y``, ``ee_z``: the two positions themselves.

Training (``train/robot_data.py``), the closed loop (``eval/robot_closed_loop.py``) and the LeRobot replay
(``eval/robot_eval.py``) all call :func:`compose_state`, so a model reads the same vector everywhere. A dim that
cannot be filled from what is given is a :class:`StateSourceError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from blockpilot.errors import BlockpilotError

from .plans import BLOCK_OFFSET_DIMS

FloatArray = npt.NDArray[np.float64]
ENV_STATE, EE_POSE, JOINTS = "environment_state", "ee_pose", "joints"


class StateSourceError(BlockpilotError, ValueError):
    """A schema state dim that the given sources cannot fill; the message names the dim and what it needs."""


def _offset(axis: int) -> Callable[[Mapping[str, FloatArray]], float]:
    return lambda s: float(s[ENV_STATE][axis] - s[EE_POSE][axis])


def _position(source: str, axis: int) -> Callable[[Mapping[str, FloatArray]], float]:
    return lambda s: float(s[source][axis])


# dim name -> (the sources it needs, how it is computed from {source: values})
DERIVED_STATE_DIMS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, FloatArray]], float]]] = {}
for _axis, _name in enumerate("xyz"):
    DERIVED_STATE_DIMS[f"block_d{_name}"] = ((ENV_STATE, EE_POSE), _offset(_axis))
    DERIVED_STATE_DIMS[f"block_{_name}"] = ((ENV_STATE,), _position(ENV_STATE, _axis))
    DERIVED_STATE_DIMS[f"ee_{_name}"] = ((EE_POSE,), _position(EE_POSE, _axis))


def joint_dims(state_dims: Sequence[str]) -> list[str]:
    """The dims of ``state_dims`` that are joint positions (every dim that is not derived), in order."""
    return [d for d in state_dims if d not in DERIVED_STATE_DIMS]


def dim_sources(state_dims: Sequence[str]) -> set[str]:
    """Which sources (``joints``, ``environment_state``, ``ee_pose``) the dims need between them."""
    needed = {JOINTS} if joint_dims(state_dims) else set()
    for dim in state_dims:
        if dim in DERIVED_STATE_DIMS:
            needed.update(DERIVED_STATE_DIMS[dim][0])
    return needed


def unfillable_dims(state_dims: Sequence[str], available: set[str], joints: Sequence[str] | None = None) -> list[str]:
    """The dims that sources ``available`` cannot fill (a joint dim also when ``joints`` is given and lacks it)."""
    missing = []
    for dim in state_dims:
        derived = DERIVED_STATE_DIMS.get(dim)
        if derived is not None:
            if not set(derived[0]) <= available:
                missing.append(dim)
        elif JOINTS not in available or (joints is not None and dim not in joints):
            missing.append(dim)
    return missing


def compose_state(state_dims: Sequence[str], joints: Mapping[str, float], *,
                  environment_state: npt.ArrayLike | None = None, ee_pose: npt.ArrayLike | None = None,
                  where: str = "state") -> FloatArray:
    """The state vector of ``state_dims``, in order: joint dims from ``joints`` (name -> radians), derived dims
    from ``environment_state`` and ``ee_pose``. Raises :class:`StateSourceError` naming the first dim it cannot
    fill (``where`` says whose state it is)."""
    sources: dict[str, FloatArray] = {}
    for name, value in ((ENV_STATE, environment_state), (EE_POSE, ee_pose)):
        if value is not None:
            array = np.asarray(value, dtype=np.float64).reshape(-1)
            if array.size < 3:
                raise StateSourceError(f"{where}: {name} has {array.size} value(s); at least x, y, z are needed")
            sources[name] = array
    out = np.empty(len(state_dims), dtype=np.float64)
    for i, dim in enumerate(state_dims):
        derived = DERIVED_STATE_DIMS.get(dim)
        if derived is None:
            if dim not in joints:
                raise StateSourceError(f"{where}: state dim {dim!r} is not a joint it has "
                                       f"({', '.join(joints) or 'none'})")
            out[i] = float(joints[dim])
            continue
        lacking = [s for s in derived[0] if s not in sources]
        if lacking:
            raise StateSourceError(f"{where}: state dim {dim!r} needs {' and '.join(lacking)}, which it does not have")
        out[i] = derived[1](sources)
    return out


__all__ = ["BLOCK_OFFSET_DIMS", "DERIVED_STATE_DIMS", "StateSourceError", "compose_state", "dim_sources",
           "joint_dims", "unfillable_dims"]
