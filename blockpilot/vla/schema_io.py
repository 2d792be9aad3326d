"""The answer schema a checkpoint was trained with, kept beside it in ``blockpilot.json``.

A checkpoint directory in the HF layout says nothing about the answer layout its model learned;
a model trained on a shorter explanation slot, for one, needs that scaffold to decode. The file
holds ``{"schema": {"kind": "driving" | "robot" | "action_chunk", <schema fields>}, ...}``; other top-level keys
(training provenance) are kept for readers that want them. Without the file a checkpoint is
taken to answer in the nuScenes driving layout, as Fast-dDrive checkpoints do.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from .config import ConfigError, read_json_object
from .plans import ActionChunkSchema, DrivingSchema, RobotActionSchema

SCHEMA_FILE = "blockpilot.json"
# ``--schema`` preset names (the CLI's shared option) and what each builds.
SCHEMA_PRESETS: dict[str, Any] = {
    "driving-nuscenes": DrivingSchema.nuscenes, "driving-wod": DrivingSchema.wod_e2e, "robot": RobotActionSchema,
    "so101-joints": ActionChunkSchema.so101_joints, "ee-delta": ActionChunkSchema.ee_delta,
    "so101-ee": ActionChunkSchema.so101_ee, "so101-ee-block": ActionChunkSchema.so101_ee_block,
}
# The layouts a blockpilot.json (and a bundle's manifest) can hold, by their "kind".
StoredSchema = DrivingSchema | RobotActionSchema | ActionChunkSchema
_KINDS: dict[str, type[DrivingSchema] | type[RobotActionSchema] | type[ActionChunkSchema]] = {
    "driving": DrivingSchema, "robot": RobotActionSchema, "action_chunk": ActionChunkSchema,
}


def schema_to_dict(schema: StoredSchema) -> dict[str, Any]:
    kind = next(k for k, cls in _KINDS.items() if isinstance(schema, cls))
    out: dict[str, Any] = {"kind": kind}
    for f in fields(schema):
        if f.init:
            value = getattr(schema, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def schema_from_dict(data: dict[str, Any], where: str = SCHEMA_FILE) -> StoredSchema:
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"{where}: schema.kind must be one of {sorted(_KINDS)}, got {kind!r}")
    cls = _KINDS[kind]
    known = {f.name for f in fields(cls) if f.init}
    params = {k: v for k, v in data.items() if k != "kind"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {kind} schema field(s) {unknown}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid {kind} schema ({exc})") from exc


def save_schema(checkpoint_dir: str | Path, schema: StoredSchema, **extra: Any) -> Path:
    """Write ``blockpilot.json`` with the schema and any ``extra`` top-level entries."""
    path = Path(checkpoint_dir) / SCHEMA_FILE
    atomic_write(path, json.dumps({"schema": schema_to_dict(schema), **extra}, indent=2) + "\n")
    return path


def load_schema(checkpoint_dir: str | Path) -> StoredSchema:
    """The checkpoint's answer schema; :meth:`DrivingSchema.nuscenes` when it has no ``blockpilot.json``."""
    path = Path(checkpoint_dir) / SCHEMA_FILE
    if not path.is_file():
        return DrivingSchema.nuscenes()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("schema"), dict):
        raise ConfigError(f"{path}: expected an object with a 'schema' object")
    return schema_from_dict(data["schema"], str(path))


def resolve_schema(checkpoint_dir: str | Path | None, spec: str | Path | None) -> Any:
    """The answer schema a command decodes with, from the shared ``--schema`` option.

    ``spec`` None: the checkpoint's ``blockpilot.json``, else the nuScenes driving preset. A preset name
    (:data:`SCHEMA_PRESETS`): that preset. A path to a JSON file: either ``blockpilot.json``-style
    (``{"schema": {"kind": ...}}``) or a JSON Schema document, compiled by
    :func:`blockpilot.vla.json_schema.compile_schema`. Raises :class:`ConfigError` naming the file.
    """
    if spec is None:
        return load_schema(checkpoint_dir) if checkpoint_dir is not None else DrivingSchema.nuscenes()
    name = str(spec)
    if name in SCHEMA_PRESETS:
        return SCHEMA_PRESETS[name]()
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"--schema {name!r}: neither a preset ({', '.join(SCHEMA_PRESETS)}) nor an existing file")
    data = read_json_object(path, expected="a JSON object (a blockpilot.json or a JSON Schema document)")
    if isinstance(data.get("schema"), dict) and "kind" in data["schema"]:
        return schema_from_dict(data["schema"], str(path))
    try:
        module = importlib.import_module("blockpilot.vla.json_schema")
    except ImportError as exc:
        raise ConfigError(f"{path}: a JSON Schema document needs blockpilot.vla.json_schema, which this build "
                          f"lacks ({exc})") from exc
    return module.compile_schema(data, where=str(path))


def add_schema_option(parser: Any) -> None:
    """The shared ``--schema`` option of plan / eval / export / quantize (an ``argparse`` parser)."""
    parser.add_argument("--schema", default=None,
                        help="answer schema: a preset (" + ", ".join(SCHEMA_PRESETS) + ") or a JSON file "
                             "(blockpilot.json-style or a JSON Schema document); default: the checkpoint's "
                             "blockpilot.json, else driving-nuscenes")
