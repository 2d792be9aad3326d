"""Planner node parameters: validation naming the field, and ROS 2 params-file loading (no DDS)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from blockpilot.ros_nodes import params as params_module
from blockpilot.ros_nodes.params import PARAM_DESCRIPTIONS, ParamsError, PlannerParams, load_params_file
from blockpilot.runtime.plan_types import DecoderSettings


def test_defaults_are_valid_and_resolve_the_backend() -> None:
    p = PlannerParams()
    assert p.output_frame == "base_link" and p.output_kind == "path" and p.diagnostics_topic == "/diagnostics"
    assert PlannerParams(checkpoint="ckpt").resolved_backend == "torch"
    assert PlannerParams(bundle="b").resolved_backend == "onnxruntime"
    assert PlannerParams(bundle="b", backend="tensorrt").resolved_backend == "tensorrt"
    assert PlannerParams(checkpoint="ckpt", backend="cuda").resolved_backend == "cuda"  # the runtime's names, all
    assert PlannerParams(checkpoint="ckpt", decoder="rollouts", rollouts=3).decoder_settings() == \
        DecoderSettings(name="rollouts", rollouts=3)
    assert set(PARAM_DESCRIPTIONS) <= set(p.as_dict())


def test_a_model_is_required_only_when_asked() -> None:
    with pytest.raises(ParamsError, match="neither is set") as info:
        PlannerParams().require_model()
    assert info.value.field == "checkpoint"
    assert PlannerParams(checkpoint="ckpt").require_model().model_path == "ckpt"


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"checkpoint": "a", "bundle": "b"}, "checkpoint", "not both"),
    ({"checkpoint": "a", "backend": "onnxruntime"}, "backend", "needs a bundle"),
    ({"bundle": "b", "backend": "torch"}, "backend", "a bundle runs on"),
    ({"backend": "jax"}, "backend", "must be one of"),
    ({"device": " "}, "device", "must not be empty"),
    ({"threads": 0}, "threads", "at least 1"),
    ({"decoder": "beam"}, "decoder", "must be one of"),
    ({"rollouts": 0}, "rollouts", "at least 1"),
    ({"deadline_ms": -1.0}, "deadline_ms", "positive finite"),
    ({"deadline_ms": math.inf}, "deadline_ms", "positive finite"),
    ({"max_odom_age_ms": math.nan}, "max_odom_age_ms", "positive finite"),
    ({"diagnostics_period_s": 0.0}, "diagnostics_period_s", "positive finite"),
    ({"default_route_command": "fly"}, "default_route_command", "must be one of"),
    ({"output_frame": "/base_link"}, "output_frame", "leading slash"),
    ({"output_frame": ""}, "output_frame", "leading slash"),
    ({"output_kind": "mesh"}, "output_kind", "must be one of"),
    ({"path_topic": "bad topic"}, "path_topic", "not a valid ROS topic name"),
    ({"odometry_topic": ""}, "odometry_topic", "not a valid ROS topic name"),
    ({"diagnostics_topic": "/2bad"}, "diagnostics_topic", "not a valid ROS topic name"),
    ({"image_topic": "", "compressed_image_topic": ""}, "image_topic", "needs a camera"),
    ({"camera_queue_depth": 0}, "camera_queue_depth", "at least 1"),
    ({"threads": "1"}, "threads", "expected int, got str"),
    ({"threads": True}, "threads", "expected int, got bool"),
    ({"deadline_ms": "fast"}, "deadline_ms", "expected float"),
    ({"checkpoint": 3}, "checkpoint", "expected str"),
    ({"use_sim_time": 1}, "use_sim_time", "expected bool"),
]


@pytest.mark.parametrize(("values", "field", "text"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_values_name_the_field(values: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(ParamsError, match=text) as info:
        PlannerParams(**values)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_ints_become_floats_and_optional_camera_topics() -> None:
    p = PlannerParams(deadline_ms=300, max_odom_age_ms=100)
    assert isinstance(p.deadline_ms, float) and p.deadline_ms == 300.0
    assert PlannerParams(image_topic="").compressed_image_topic
    assert PlannerParams(compressed_image_topic="", image_topic="~/image").image_topic == "~/image"


def test_with_changes_validates_and_refuses_unknown_names() -> None:
    p = PlannerParams(checkpoint="ckpt")
    assert p.with_changes({"deadline_ms": 900.0}).deadline_ms == 900.0
    assert p.deadline_ms == 500.0  # frozen: a copy
    with pytest.raises(ParamsError) as info:
        p.with_changes({"deadline": 1.0})
    assert info.value.field == "deadline" and "unknown parameter" in str(info.value)
    with pytest.raises(ParamsError, match="not both"):
        p.with_changes({"bundle": "b"})


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    doc = params_module.__doc__ or ""
    example = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    p = load_params_file(_write(tmp_path / "p.yaml", "\n".join(line[4:] for line in example.splitlines())))
    assert p == PlannerParams(checkpoint="models/reference")


def test_load_params_file_merges_the_wildcard_section(tmp_path: Path) -> None:
    data = {"/**": {"ros__parameters": {"deadline_ms": 250, "threads": 2}},
            "/blockpilot_planner": {"ros__parameters": {"checkpoint": "ckpt", "threads": 3}},
            "other_node": {"ros__parameters": {"foo": 1}}}
    p = load_params_file(_write(tmp_path / "p.yaml", data))
    assert (p.checkpoint, p.threads, p.deadline_ms) == ("ckpt", 3, 250.0)
    named = load_params_file(_write(tmp_path / "q.yaml", {"car_planner": {"ros__parameters": {"bundle": "b"}}}),
                             node_name="car_planner")
    assert named.bundle == "b" and named.resolved_backend == "onnxruntime"


@pytest.mark.parametrize(("content", "field", "text"), [
    ({"blockpilot_planner": {"ros__parameters": {"checkpoint": "c", "deadline": 5}}}, "deadline", "unknown parameter"),
    ({"blockpilot_planner": {"ros__parameters": {"checkpoint": "c", "threads": 0}}}, "threads", "at least 1"),
    ({"blockpilot_planner": {"ros__parameters": {"deadline_ms": 5.0}}}, "checkpoint", "neither is set"),
    ({"blockpilot_planner": {"parameters": {}}}, "blockpilot_planner", "ros__parameters"),
    ({"someone_else": {"ros__parameters": {}}}, "<file>", "sections: someone_else"),
    ("blockpilot_planner: [unclosed", "<file>", "not valid YAML"),
    ("- a list", "<file>", "expected a mapping"),
])
def test_load_params_file_errors_name_file_and_field(tmp_path: Path, content: Any, field: str, text: str) -> None:
    path = _write(tmp_path / "p.yaml", content)
    with pytest.raises(ParamsError, match=text) as info:
        load_params_file(path)
    assert info.value.field == field and info.value.source == str(path) and str(path) in str(info.value)


def test_load_params_file_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="cannot read"):
        load_params_file(tmp_path / "nope.yaml")
