"""Run a test module's Triton cases under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, so the cases run in a fresh
interpreter: the test file is executed as a script and prints its results as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_interpreted(script: str | Path, timeout_s: int = 600) -> dict[str, Any]:
    """The JSON object ``script`` prints last when run with ``TRITON_INTERPRET=1`` from the repository root."""
    path = Path(script).resolve()
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=path.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results
