"""Run a test module's Triton cases under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, so the cases run in a fresh
interpreter: the test file is executed as a script and prints its results as JSON on its last line.

The interpreter is slow (seconds a launch at the larger shapes), so a module whose cases are marked ``slow`` asks
the script for the cases its selected tests read (:func:`selected_params`): the default run computes only the
small representatives, ``-m slow`` only the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_interpreted(script: str | Path, *args: str, timeout_s: int = 600) -> dict[str, Any]:
    """The JSON object ``script`` prints last when run with ``TRITON_INTERPRET=1`` (and ``args`` on its command
    line) from the repository root."""
    path = Path(script).resolve()
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=path.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def selected_params(request: pytest.FixtureRequest, param: str) -> list[str]:
    """The values of parametrize argument ``param`` over the tests this session runs from the requesting fixture's
    module that use that fixture, in collection order: what a module-scoped fixture has to compute for them."""
    values: list[str] = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is not request.module or callspec is None \
                or request.fixturename not in getattr(item, "fixturenames", ()):
            continue
        value = callspec.params.get(param)
        if value is not None and str(value) not in values:
            values.append(str(value))
    return values


def selected_tests(request: pytest.FixtureRequest) -> set[str]:
    """The names (without parameters) of the tests this session runs from the requesting fixture's module."""
    return {getattr(item, "originalname", item.name) for item in request.session.items
            if getattr(item, "module", None) is request.module}
