#!/usr/bin/env bash
# Runs the blockpilot planner node inside a ROS 2 environment. systemd cannot `source` a setup.bash itself, so
# blockpilot-planner.service starts this script, which sources ROS 2 (and an optional workspace overlay) and then
# replaces itself with the planner, so systemd's signals (SIGINT on stop) reach the node directly.
#
# Settings (environment; the unit sets them, /etc/blockpilot/planner.env overrides them):
#   ROS_DISTRO            humble (JetPack 6, Ubuntu 22.04) | jazzy (JetPack 7, Ubuntu 24.04); default humble
#   BLOCKPILOT_ROS_SETUP  ROS 2 setup file; default /opt/ros/$ROS_DISTRO/setup.bash
#   BLOCKPILOT_OVERLAY    optional workspace setup file sourced after it (e.g. ~/ws/install/setup.bash)
#   BLOCKPILOT_VENV       virtualenv holding blockpilot; default /opt/blockpilot/venv
#   BLOCKPILOT_PARAMS     planner params file; default /etc/blockpilot/planner.yaml
# Extra arguments go to `blockpilot ros planner` (e.g. --ros-args -p deadline_ms:=300.0).
set -euo pipefail

ROS_DISTRO="${ROS_DISTRO:-humble}"
ros_setup="${BLOCKPILOT_ROS_SETUP:-/opt/ros/${ROS_DISTRO}/setup.bash}"
venv="${BLOCKPILOT_VENV:-/opt/blockpilot/venv}"
params="${BLOCKPILOT_PARAMS:-/etc/blockpilot/planner.yaml}"

fail() {
    echo "run-planner: $*" >&2
    exit 78  # EX_CONFIG: systemd logs it; Restart=on-failure retries within the unit's start limit
}

[[ -r "${ros_setup}" ]] || fail "${ros_setup} not found: install ROS 2 (apt install ros-${ROS_DISTRO}-ros-base)"
[[ -x "${venv}/bin/blockpilot" ]] || fail "${venv}/bin/blockpilot not found: pip install blockpilot into ${venv}"
[[ -r "${params}" ]] || fail "${params} not found: start from \`blockpilot ros params\` (the shipped defaults)"

# ROS setup scripts read unset variables; relax -u while sourcing them.
set +u
# shellcheck disable=SC1090
source "${ros_setup}"
if [[ -n "${BLOCKPILOT_OVERLAY:-}" ]]; then
    # shellcheck disable=SC1090
    source "${BLOCKPILOT_OVERLAY}"
fi
set -u

exec "${venv}/bin/blockpilot" ros planner --params "${params}" "$@"
