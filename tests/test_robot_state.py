"""The robot prompt's state composed by name (vla/robot_state.py): joints by name, the block's offset from the
gripper point from the simulator's environment_state and ee_pose, and a typed error naming a dim it cannot fill."""

from __future__ import annotations

import numpy as np
import pytest

from blockpilot.eval.robot_closed_loop import ClosedLoopUsageError, check_env_schema
from blockpilot.vla.plans import BLOCK_OFFSET_DIMS, SO101_JOINTS, ActionChunkSchema
from blockpilot.vla.robot_state import (
    EE_POSE,
    ENV_STATE,
    JOINTS,
    StateSourceError,
    compose_state,
    dim_sources,
    unfillable_dims,
)
from blockpilot.vla.schema_io import SCHEMA_PRESETS

JOINT_VALUES = dict(zip(SO101_JOINTS, [0.1, -0.2, 0.3, -0.4, 0.5, 0.6], strict=True))
BLOCK = np.array([0.22, -0.05, 0.02, 9.0, 9.0, 9.0])  # a goal after the block is ignored
EE_POSE_VALUES = np.array([0.39, 0.01, 0.23, 1.0, 0.0, 0.0, 0.0])


def test_the_block_preset_is_the_so101_ee_chunk_with_the_offset_after_the_joints() -> None:
    schema = SCHEMA_PRESETS["so101-ee-block"]()
    base = ActionChunkSchema.so101_ee()
    assert schema.state_dims == SO101_JOINTS + BLOCK_OFFSET_DIMS
    assert (schema.dims, schema.steps, schema.rate_hz, schema.frac_digits) == (base.dims, base.steps, base.rate_hz,
                                                                               base.frac_digits)
    assert schema != base  # a different schema: a different example cache key and checkpoint schema


def test_compose_state_puts_joints_then_block_minus_gripper_point() -> None:
    schema = ActionChunkSchema.so101_ee_block()
    state = compose_state(schema.state_dims, JOINT_VALUES, environment_state=BLOCK, ee_pose=EE_POSE_VALUES)
    np.testing.assert_allclose(state[:6], list(JOINT_VALUES.values()))
    np.testing.assert_allclose(state[6:], [0.22 - 0.39, -0.05 - 0.01, 0.02 - 0.23])
    reordered = compose_state(("block_dz", "gripper", "ee_x", "block_x"), JOINT_VALUES, environment_state=BLOCK,
                              ee_pose=EE_POSE_VALUES)
    np.testing.assert_allclose(reordered, [0.02 - 0.23, 0.6, 0.39, 0.22])


@pytest.mark.parametrize(("dims", "kwargs", "named"), [
    (("shoulder_pan", "block_dx"), {"ee_pose": EE_POSE_VALUES}, "'block_dx' needs environment_state"),
    (("block_dy",), {"environment_state": BLOCK}, "'block_dy' needs ee_pose"),
    (("shoulder_pan", "elbow"), {}, "'elbow' is not a joint"),
])
def test_a_dim_without_its_source_is_a_typed_error_naming_it(dims: tuple[str, ...], kwargs: dict,
                                                             named: str) -> None:
    with pytest.raises(StateSourceError, match=named):
        compose_state(dims, JOINT_VALUES, where="test", **kwargs)


def test_which_sources_a_schema_needs_and_which_dims_a_source_set_cannot_fill() -> None:
    dims = ActionChunkSchema.so101_ee_block().state_dims
    assert dim_sources(dims) == {JOINTS, ENV_STATE, EE_POSE}
    assert dim_sources(SO101_JOINTS) == {JOINTS}
    assert unfillable_dims(dims, {JOINTS}) == list(BLOCK_OFFSET_DIMS)
    assert unfillable_dims(dims, {JOINTS, ENV_STATE, EE_POSE}, joints=SO101_JOINTS[:5]) == ["gripper"]


def test_the_closed_loop_takes_the_block_schema_and_refuses_a_state_it_cannot_give() -> None:
    check_env_schema(ActionChunkSchema.so101_ee_block(), "--schema")
    odd = ActionChunkSchema(steps=8, dims=("dx", "dy", "dz", "gripper"), rate_hz=10.0, frac_digits=2,
                            state_dims=("shoulder_pan", "goal_dx"))
    with pytest.raises(ClosedLoopUsageError, match="goal_dx"):
        check_env_schema(odd, "--schema")
