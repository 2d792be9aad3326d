"""Reading nuScenes files: the JSON tables (indexed by token), the version folder, the CAN-bus pose
messages and keyframe images, each failure a typed error naming the file or record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .images import decode_image
from .types import DatasetError, ImageArray, SampleError

Row = dict[str, Any]
CanPose = tuple[np.ndarray, np.ndarray, np.ndarray]


def load_table(path: Path) -> dict[str, Row]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: nuScenes table not found") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the table ({exc})") from None
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: a nuScenes table is a JSON list of records, got {type(rows).__name__}")
    out: dict[str, Row] = {}
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("token"), str):
            raise DatasetError(f"{path}: record {n} is not an object with a string token")
        out[row["token"]] = row
    return out


def find_version(root: Path, version: str) -> str:
    if version != "auto":
        if not (root / version).is_dir():
            raise DatasetError(f"{root / version}: nuScenes version folder not found")
        return version
    found = sorted(p.name for p in root.glob("v1.0-*") if (p / "sample.json").is_file())
    if len(found) != 1:
        folders = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir())
        what = "no v1.0-* folder with sample.json" if not found else f"several versions {found}"
        raise DatasetError(f"{root}: {what} (folders: {folders or 'none'}); pass version= explicitly")
    return found[0]


def field(row: Row, table: str, key: str) -> Any:
    if key not in row:
        raise SampleError(f"{table} {row.get('token')}: no field {key!r}")
    return row[key]


def read_image(root: Path, rel: str) -> ImageArray:
    path = root / rel
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SampleError(f"{path}: cannot read the image ({exc.strerror or exc})") from None
    return decode_image(data, str(path))


def read_can_pose(path: Path) -> CanPose | str | None:
    """(utime, vel[0], accel[0]) arrays of a CAN-bus ``<scene>_pose.json``, sorted by time; ``None``
    when the file does not exist (normal: some logs have no CAN data), else the reason it is unusable."""
    try:
        msgs = json.loads(path.read_text(encoding="utf-8"))
        arr = np.array([[m["utime"], m["vel"][0], m["accel"][0]] for m in msgs], dtype=np.float64)
        if arr.ndim != 2 or len(arr) == 0:
            raise ValueError("no messages")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        return f"{path}: unusable ({type(exc).__name__}: {exc})"
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    return arr[:, 0], arr[:, 1], arr[:, 2]
