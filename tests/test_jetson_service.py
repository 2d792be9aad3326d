"""The systemd unit and its wrapper script in jetson/: they parse, keep the GPU reachable, and every blockpilot
command they run exists in the CLI. The wrapper is run for real against a fake ROS 2 install and venv."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockpilot.cli import _cmd_jetson, _cmd_ros, build_parser

JETSON_DIR = Path(__file__).resolve().parents[1] / "jetson"
UNIT = JETSON_DIR / "blockpilot-planner.service"
WRAPPER = JETSON_DIR / "run-planner.sh"
ENV_FILE = JETSON_DIR / "planner.env"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys like Environment= and ExecStartPre= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in unit["Service"]["Environment"])


def command_argv(value: str, env: dict[str, str]) -> list[str]:
    """An Exec*= line as systemd runs it: prefixes dropped, ${VAR} substituted, split into words."""
    value = value.lstrip("-+@:!")
    value = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], value)
    return shlex.split(value)


def test_unit_parses(unit: dict[str, dict[str, list[str]]]) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"} == set(unit)
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"] and service["KillSignal"] == ["SIGINT"]
    assert service["ExecStart"] == ["/opt/blockpilot/run-planner.sh"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]


def test_every_blockpilot_command_exists_in_the_cli(unit: dict[str, dict[str, list[str]]]) -> None:
    env = environment(unit)
    commands = unit["Service"]["ExecStartPre"] + unit["Service"]["ExecStopPost"]
    assert len(commands) == 2
    parsed = []
    for value in commands:
        assert value.startswith("-+"), "power steps run privileged and must not block the planner"
        argv = command_argv(value, env)
        assert argv[0] == f"{env['BLOCKPILOT_VENV']}/bin/blockpilot"
        args = build_parser().parse_args(argv[1:])
        assert args.func is _cmd_jetson and args.jetson_command == "power"
        assert args.state == env["BLOCKPILOT_POWER_STATE"]
        parsed.append(args)
    assert parsed[0].mode == "MAXN" and parsed[0].max_clocks and parsed[1].restore


def test_the_wrapper_runs_the_planner_command_of_the_cli() -> None:
    text = WRAPPER.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and os.access(WRAPPER, os.X_OK)
    subprocess.run(["bash", "-n", str(WRAPPER)], check=True)
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line)[1:]
    argv = [a.replace("${params}", "/etc/blockpilot/planner.yaml") for a in argv]
    assert argv[0] == "${venv}/bin/blockpilot" and argv[-1] == "$@"
    args = build_parser().parse_args(argv[1:-1])
    assert args.func is _cmd_ros and args.ros_command == "planner" and args.params == "/etc/blockpilot/planner.yaml"


def test_gpu_stays_reachable(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    assert "video" in service["SupplementaryGroups"][0].split()
    # Each of these hides /dev/nvhost-*, /dev/nvmap (Orin) or /dev/nvidia* (Thor) from the planner.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert "DevicePolicy" not in service and "DeviceAllow" not in service
    assert service.get("ProtectClock", ["no"]) == ["no"]  # implies DeviceAllow=char-rtc on systemd < 253
    assert service.get("MemoryDenyWriteExecute", ["no"]) == ["no"]  # CUDA's JIT
    env = environment(unit)
    writable = {"/var/lib/blockpilot", "/var/cache/blockpilot", "/var/log/blockpilot"}
    for key in ("HOME", "ROS_LOG_DIR", "CUDA_CACHE_PATH", "TRITON_CACHE_DIR"):
        assert any(env[key].startswith(d) for d in writable), key
    assert {service[k][0] for k in ("StateDirectory", "CacheDirectory", "LogsDirectory")} == {"blockpilot"}


def test_env_file_overrides_known_settings(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Service"]["EnvironmentFile"] == ["-/etc/blockpilot/planner.env"]
    wrapper = WRAPPER.read_text()
    known = set(environment(unit)) | {"BLOCKPILOT_OVERLAY", "ROS_DOMAIN_ID", "RMW_IMPLEMENTATION"}
    for line in ENV_FILE.read_text().splitlines():
        line = line.lstrip("#").strip()
        if re.fullmatch(r"[A-Z_]+=\S*", line):
            key = line.split("=", 1)[0]
            assert key in known, key
            if key.startswith("BLOCKPILOT_") and key not in ("BLOCKPILOT_POWER_MODE", "BLOCKPILOT_POWER_STATE"):
                assert key in wrapper, key


def test_systemd_accepts_the_unit() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is part of every systemd install this project targets"
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "is not executable: No such file or directory" not in line]
    assert problems == []  # only the install paths are missing on this machine


def make_fake_install(tmp_path: Path) -> dict[str, str]:
    ros = tmp_path / "ros" / "setup.bash"
    ros.parent.mkdir()
    ros.write_text('export FAKE_ROS_SOURCED="${ROS_DISTRO}"\nexport AMENT_PREFIX_PATH="$UNSET_BY_DESIGN"\n')
    overlay = tmp_path / "ws_setup.bash"
    overlay.write_text("export FAKE_OVERLAY=1\n")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = venv_bin / "blockpilot"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'argv': sys.argv[1:], 'ros': os.environ.get('FAKE_ROS_SOURCED'), "
                    "'overlay': os.environ.get('FAKE_OVERLAY'), 'ppid': os.getppid()}))\n")
    fake.chmod(0o755)
    params = tmp_path / "planner.yaml"
    params.write_text("blockpilot_planner:\n  ros__parameters: {}\n")
    return {"PATH": os.environ["PATH"], "ROS_DISTRO": "jazzy", "BLOCKPILOT_ROS_SETUP": str(ros),
            "BLOCKPILOT_VENV": str(tmp_path / "venv"), "BLOCKPILOT_PARAMS": str(params),
            "BLOCKPILOT_OVERLAY": str(overlay)}


def test_the_wrapper_sources_ros_and_execs_the_planner(tmp_path: Path) -> None:
    env = make_fake_install(tmp_path)
    result = subprocess.run([str(WRAPPER), "--ros-args", "-p", "deadline_ms:=300.0"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["argv"] == ["ros", "planner", "--params", env["BLOCKPILOT_PARAMS"], "--ros-args", "-p",
                            "deadline_ms:=300.0"]
    assert data["ros"] == "jazzy" and data["overlay"] == "1"
    assert data["ppid"] == os.getpid()  # exec: the planner replaced the shell, so systemd signals reach it


@pytest.mark.parametrize(("missing", "message"), [
    ("BLOCKPILOT_ROS_SETUP", "install ROS 2 (apt install ros-jazzy-ros-base)"),
    ("BLOCKPILOT_VENV", "pip install blockpilot into"),
    ("BLOCKPILOT_PARAMS", "start from `blockpilot ros params`"),
])
def test_the_wrapper_explains_a_broken_install(tmp_path: Path, missing: str, message: str) -> None:
    env = make_fake_install(tmp_path)
    env[missing] = str(tmp_path / "does-not-exist")
    result = subprocess.run([str(WRAPPER)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 and message in result.stderr and result.stdout == ""
