#!/usr/bin/env bash
# Set up (if needed), then run today's end-to-end demo on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/blockpilot demo "$@"
