"""The colcon package ros/blockpilot_ros: manifest, entry points, launch file and the params YAML it
shares with the Python package (no ROS build tools needed: everything is parsed, compiled or imported)."""

from __future__ import annotations

import argparse
import ast
import configparser
import dataclasses
import importlib
import inspect
import py_compile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from blockpilot.ros_nodes.cli import add_record_arguments, add_replay_arguments, default_params_file
from blockpilot.ros_nodes.params import PlannerParams, load_params_file

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ros" / "blockpilot_ros"
LAUNCH = PKG / "launch" / "planner.launch.py"
EXEC_DEPENDS = {"rclpy", "std_msgs", "sensor_msgs", "nav_msgs", "geometry_msgs", "trajectory_msgs", "diagnostic_msgs",
                "lifecycle_msgs", "launch_ros"}
ENTRY_POINTS = {"planner_node": "blockpilot.ros_nodes.planner_node:main",
                "arm_node": "blockpilot.ros_nodes.arm_node:main",
                "replay_node": "blockpilot.ros_nodes.replay_node:main",
                "lerobot_replay_node": "blockpilot.ros_nodes.lerobot_replay:main",
                "recorder_node": "blockpilot.ros_nodes.recorder_node:main"}
ARM_EXECUTABLES = {"arm_node", "lerobot_replay_node"}


def _setup_call() -> ast.Call:
    tree = ast.parse((PKG / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1
    return calls[0]


def _setup_kwarg(name: str) -> Any:
    node = next(k.value for k in _setup_call().keywords if k.arg == name)
    return ast.literal_eval(node)


def test_package_xml_is_format_3_ament_python_with_the_runtime_dependencies() -> None:
    root = ET.parse(PKG / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    package = next(n.value for n in ast.parse((PKG / "setup.py").read_text()).body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "PACKAGE")
    assert root.findtext("name") == "blockpilot_ros" == ast.literal_eval(package)
    assert root.findtext("version") == _setup_kwarg("version")
    assert root.findtext("export/build_type") == "ament_python"
    assert {e.text for e in root.findall("exec_depend")} >= EXEC_DEPENDS
    assert root.findtext("license") and root.find("maintainer") is not None


def test_entry_points_run_the_blockpilot_mains() -> None:
    scripts = dict(s.replace(" ", "").split("=") for s in _setup_kwarg("entry_points")["console_scripts"])
    assert scripts == ENTRY_POINTS
    for target in scripts.values():
        module, attr = target.split(":")
        func = getattr(importlib.import_module(module), attr)
        assert callable(func) and list(inspect.signature(func).parameters) == ["argv"]
    cfg = configparser.ConfigParser()
    cfg.read(PKG / "setup.cfg")
    # ros2 run looks for executables in lib/<package>.
    assert cfg["install"]["install_scripts"] == cfg["develop"]["script_dir"] == "$base/lib/blockpilot_ros"


def test_installed_data_files_exist() -> None:
    assert (PKG / "resource" / "blockpilot_ros").is_file()
    for name in ("package.xml", "README.md", "launch/planner.launch.py", "config/planner.yaml"):
        assert (PKG / name).is_file(), name
    source = (PKG / "setup.py").read_text()
    for pattern in ('"launch/*.launch.py"', '"config/*.yaml"', "resource/{PACKAGE}", '"package.xml"'):
        assert pattern in source
    assert "pip" in (PKG / "README.md").read_text()  # the blockpilot package itself comes from pip


def _launch_calls(name: str) -> list[ast.Call]:
    tree = ast.parse(LAUNCH.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def _keyword(call: ast.Call, name: str) -> ast.expr:
    return next(k.value for k in call.keywords if k.arg == name)


def _string_flags(call: ast.Call) -> list[str]:
    args = _keyword(call, "arguments")
    return [str(e.value) for e in ast.walk(args) if isinstance(e, ast.Constant) and str(e.value).startswith("--")]


def test_launch_file_compiles_and_drives_a_lifecycle_node(tmp_path: Path) -> None:
    py_compile.compile(str(LAUNCH), cfile=str(tmp_path / "launch.pyc"), doraise=True)
    tree = ast.parse(LAUNCH.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {("launch_ros.actions", "LifecycleNode"), ("launch_ros.events.lifecycle", "ChangeState"),
            ("launch_ros.event_handlers", "OnStateTransition"), ("lifecycle_msgs.msg", "Transition")} <= imports
    transitions = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("TRANSITION_")}
    assert transitions == {"TRANSITION_CONFIGURE", "TRANSITION_ACTIVATE"}
    declared = {ast.literal_eval(c.args[0]) for c in _launch_calls("DeclareLaunchArgument")}
    assert {"params_file", "autostart", "bag", "record_out"} <= declared
    (planner,) = _launch_calls("LifecycleNode")
    executables = {_keyword(c, "executable").value for c in [planner, *_launch_calls("Node")]}  # type: ignore[attr-defined]
    assert executables == set(ENTRY_POINTS) - ARM_EXECUTABLES  # the driving launch file
    # The flags the launch file passes are ones the nodes accept.
    assert _string_flags(planner) == ["--params", "--no-autostart"]
    parsers = {"replay_node": add_replay_arguments, "recorder_node": add_record_arguments}
    for call in _launch_calls("Node"):
        parser = argparse.ArgumentParser()
        parsers[_keyword(call, "executable").value](parser)  # type: ignore[attr-defined]
        known = {s for a in parser._actions for s in a.option_strings}
        assert set(_string_flags(call)) <= known


def test_params_yaml_is_shipped_twice_identically_and_loads() -> None:
    shipped = default_params_file()
    assert shipped == REPO / "blockpilot" / "ros_nodes" / "config" / "planner.yaml"
    assert shipped.read_bytes() == (PKG / "config" / "planner.yaml").read_bytes()
    params = load_params_file(shipped)
    assert params.checkpoint == "models/reference" and (REPO / params.checkpoint / "config.json").is_file()
    # Every field is listed, with its default (the checkpoint aside), so the file documents them all.
    listed = yaml.safe_load(shipped.read_text())["blockpilot_planner"]["ros__parameters"]
    defaults = dataclasses.asdict(PlannerParams())
    assert set(listed) == set(defaults)
    assert {k: v for k, v in dataclasses.asdict(params).items() if k != "checkpoint"} == {
        k: v for k, v in defaults.items() if k != "checkpoint"}


@pytest.mark.parametrize("path", ["blockpilot/ros_nodes/config/planner.yaml", "ros/blockpilot_ros/config/planner.yaml"])
def test_params_yaml_is_commented(path: str) -> None:
    lines = (REPO / path).read_text().splitlines()
    assert sum("#" in line for line in lines) >= 15
