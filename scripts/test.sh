#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check blockpilot tests benchmarks
.venv/bin/mypy
# One pytest-xdist worker per core, at most 4 (BLOCKPILOT_TEST_WORKERS overrides; 0 runs in this process), each
# taking whole test files so module fixtures are built once; extra arguments (a later -n too) go to pytest.
cores=$(nproc 2>/dev/null || echo 1)
workers=${BLOCKPILOT_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
set +e
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
