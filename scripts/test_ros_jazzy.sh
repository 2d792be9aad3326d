#!/usr/bin/env bash
# Run the ROS 2 test files (tests/test_ros_*.py) against Jazzy's rclpy 7.1.6 in their own venv, .venv-jazzy.
#
#   bash scripts/test_ros_jazzy.sh              # set up (first run: a few minutes), then run the ROS tests
#   bash scripts/test_ros_jazzy.sh -k compat    # extra arguments go to pytest
#   bash scripts/test_ros_jazzy.sh --setup-only # only create / update the venv (scripts/test_ros_colcon.sh uses it)
#
# The venv gets blockpilot with the extras the ROS tests use, pinned by constraints.txt (torch included:
# never an unconstrained torch) except its ros-* lines, which constraints-ros-jazzy.txt replaces. Not run by
# CI (.ci/run): setting up the venv costs minutes; the README's distro matrix records the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-jazzy
python="${PYTHON:-python3}"
extras="ros,bags,sim,export,robot"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.blockpilot-jazzy"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
    || [ constraints-ros-jazzy.txt -nt "$stamp" ]; then
  base="$venv/constraints-no-ros.txt"
  grep -v '^ros-' constraints.txt > "$base"
  "$venv/bin/python" -m pip install --quiet -c "$base" -c constraints-ros-jazzy.txt \
    -e ".[${extras}]" "ros-rclpy[fastrtps]" pytest hypothesis transformers
  # LeRobot's dataset library, without its stale pins (as scripts/setup.sh): the arm node test writes a dataset
  "$venv/bin/python" -m pip install --quiet --no-deps -c "$base" lerobot-dataset
  touch "$stamp"
fi
version=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("ros-rclpy"))')
if [ "$version" != "7.1.6" ]; then
  echo "test_ros_jazzy.sh: $venv has ros-rclpy $version, expected 7.1.6" >&2
  exit 1
fi
echo "ros-rclpy $version, $("$venv/bin/python" -V)"
if [ "${1:-}" = "--setup-only" ]; then exit 0; fi
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_ros_*.py "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
