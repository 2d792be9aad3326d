"""Per-sample results as JSON Lines, written one flushed line per sample so a run can resume.

One record (a JSON object per line) per source item::

    sample_id, source, scene, timestamp_us       identity (sample_id is the resume key)
    status          "ok" | "parse_error" | "failed" | "skipped"
    error           null or the message (parse error, sample error, planner error)
    route_command, speed_mps, frame
    gt              null or {"times_s": [..], "xy": [[x, y], ..], "valid": [bool, ..]}
    agents          null or {"times_s": [..], "boxes": [[[x, y, yaw, length, width], ..] per time],
                             "kinds": [[str, ..] per time]}
    raters          [{"xy": [[x, y], ..], "score": s}, ..]   (4 Hz from 0.25 s)
    predictions     {"model": P, "cv": P}; P = {"times_s": [..], "xy": [[x, y], ..]}; "model" is
                    absent when the plan did not parse; "cv" (constant velocity) is there whenever
                    the sample has an ego state; "model" also has "behaviour", the manoeuvre the
                    model chose (e.g. {"longitudinal": .., "lateral": ..}) or null
    metrics         {"model": M, "cv": M} for each prediction that could be scored against the truth;
                    M = {"times_s": [..] (times shared by prediction and truth),
                         "l2": [..], "valid": [bool, ..],
                         "coll_stp3": [bool, ..] | null,  "coll_stp3_gt": [bool, ..] | null,
                         "coll_bev": [bool, ..] | null,
                         "rfs": null | {"score": s, "per_horizon": {"3": s3, "5": s5},
                                        "in_trust_region": bool}}
    stats           null or {"stage_ms": {stage: ms}, "forwards": n, "tokens_per_forward": x}
    text            the answer text (model output), "" when none

The first line of a results file is a header ``{"header": {...}}`` with the run's settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BlockpilotError

STATUSES = ("ok", "parse_error", "failed", "skipped")
FINISHED = frozenset(STATUSES)


class ResultsFileError(BlockpilotError, ValueError):
    """A results file cannot be used (corrupt line, header for different settings); names the file and line."""


def read_results(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, records) from a results file. A last line cut short by a crash is ignored; a corrupt
    line anywhere else raises :class:`ResultsFileError` naming it."""
    path = Path(path)
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the final line has no newline: a write cut short
                break
            raise ResultsFileError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ResultsFileError(f"{path}:{number}: expected a JSON object")
        if "header" in obj:
            header = obj["header"]
            continue
        if "sample_id" not in obj or obj.get("status") not in FINISHED:
            raise ResultsFileError(f"{path}:{number}: a record needs sample_id and a status in {STATUSES}")
        records.append(obj)
    return header, records


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    yield from read_results(path)[1]


class ResultsWriter:
    """Appends records to a results file, one flushed line each; cuts a torn last line first."""

    def __init__(self, path: str | Path, header: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else len(data)
            if keep != len(data):
                with self.path.open("r+b") as f:
                    f.truncate(keep)
        self._file = self.path.open("a", encoding="utf-8")
        if header is not None and self.path.stat().st_size == 0:
            self._write({"header": header})

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n")
        self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        if record.get("status") not in FINISHED:
            raise ValueError(f"record {record.get('sample_id')!r}: status must be one of {STATUSES}")
        self._write(record)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
