#!/usr/bin/env bash
# Create .venv and install blockpilot with the given extras (default: dev), pinned by constraints.txt.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.blockpilot-${extras//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
  # LeRobot's dataset library without its metadata's pins (pyproject.toml, the robot extra): its imports are in the extra
  case ",${extras}," in *,robot,*|*,dev,*)
    .venv/bin/python -m pip install --quiet --no-deps -c constraints.txt lerobot-dataset ;;
  esac
  touch "$stamp"
fi
