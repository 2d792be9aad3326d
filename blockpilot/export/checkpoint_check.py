"""What ``export`` settles about a checkpoint before any weight is read or graph exported: the answer
schema (the shared ``--schema`` option, or the checkpoint's ``blockpilot.json``, or the nuScenes preset),
and how the bundle records it for a checkpoint that has no ``blockpilot.json``."""

from __future__ import annotations

from pathlib import Path

from ..formats.bundle import BundleError, BundleWriter
from ..vla.config import ConfigError
from ..vla.plans import DrivingSchema
from ..vla.schema_io import SCHEMA_FILE, resolve_schema, save_schema, schema_to_dict


def check_bundle_target(out: Path, overwrite: bool) -> None:
    """The writer's own check of ``out`` (exists without ``overwrite``, not a bundle), run before long work."""
    BundleWriter(out, overwrite=overwrite).abort()


def checked_schema(checkpoint: Path, spec: str | None) -> DrivingSchema:
    """The driving schema the bundle's planner decodes with; :class:`BundleError` naming the file otherwise."""
    if not (checkpoint / "config.json").is_file():
        raise BundleError(f"{checkpoint}: no config.json (export needs a checkpoint directory)")
    try:
        schema = resolve_schema(checkpoint, spec)
    except ConfigError as exc:
        raise BundleError(str(exc)) from exc
    if not isinstance(schema, DrivingSchema):
        where = f"--schema {spec}" if spec is not None else str(checkpoint / SCHEMA_FILE)
        raise BundleError(f"{where}: bundles hold a driving planner today; got a {type(schema).__name__}")
    return schema


def write_schema_file(writer: BundleWriter, schema: DrivingSchema, checkpoint: Path, scratch: Path, *,
                      explicit: bool) -> None:
    """Record ``schema`` in the manifest, and as ``model/blockpilot.json`` where the checkpoint has none or
    ``--schema`` chose another (so the bundle's planner reads the schema it was exported with)."""
    writer.schema = schema_to_dict(schema)
    if explicit or not (checkpoint / SCHEMA_FILE).is_file():
        written = save_schema(scratch / "schema", schema, source="blockpilot export")
        writer.add_file(written, "model")
