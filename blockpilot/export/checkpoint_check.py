"""What ``export`` settles about a checkpoint before any weight is read or graph exported: the answer
schema (the shared ``--schema`` option, or the checkpoint's ``blockpilot.json``, or the nuScenes preset),
and how the bundle records it for a checkpoint that has no ``blockpilot.json``; and what ``--checkpoint`` names
(a checkpoint, or what ``blockpilot quantize`` wrote)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..formats.bundle import BundleError, BundleWriter
from ..vla.config import ConfigError
from ..vla.plans import ActionChunkSchema, DrivingSchema
from ..vla.schema_io import SCHEMA_FILE, StoredSchema, resolve_schema, save_schema, schema_to_dict


def check_bundle_target(out: Path, overwrite: bool) -> None:
    """The writer's own check of ``out`` (exists without ``overwrite``, not a bundle), run before long work."""
    BundleWriter(out, overwrite=overwrite).abort()


def checked_schema(checkpoint: Path, spec: str | None, *,
                   calibrate: str | None = None) -> DrivingSchema | ActionChunkSchema:
    """The driving or action-chunk schema the bundle's planner decodes with; :class:`BundleError` naming the file
    otherwise. ``calibrate`` (the ``--recipe`` export quantizes with itself, on generated driving scenes): refused for
    an action-chunk schema, which must be calibrated on robot observations by ``blockpilot quantize`` first."""
    if not (checkpoint / "config.json").is_file():
        raise BundleError(f"{checkpoint}: no config.json (export needs a checkpoint directory)")
    try:
        schema = resolve_schema(checkpoint, spec)
    except ConfigError as exc:
        raise BundleError(str(exc)) from exc
    if not isinstance(schema, (DrivingSchema, ActionChunkSchema)):
        where = f"--schema {spec}" if spec is not None else str(checkpoint / SCHEMA_FILE)
        raise BundleError(f"{where}: bundles hold a driving or an action-chunk planner (e.g. --schema so101-joints) "
                          f"today; got a {type(schema).__name__}")
    if calibrate is not None and isinstance(schema, ActionChunkSchema):
        raise BundleError(f"--recipe {calibrate}: export calibrates on generated driving scenes, and this model "
                          "answers in action chunks; quantize it on robot observations first (blockpilot quantize "
                          f"--checkpoint {checkpoint} --recipe {calibrate} --calib-source lerobot --calib-dataroot "
                          "DATASET) and export that output")
    return schema


def write_schema_file(writer: BundleWriter, schema: StoredSchema, checkpoint: Path, scratch: Path, *,
                      explicit: bool) -> None:
    """Record ``schema`` in the manifest, and as ``model/blockpilot.json`` where the checkpoint has none or
    ``--schema`` chose another (so the bundle's planner reads the schema it was exported with)."""
    writer.schema = schema_to_dict(schema)
    if explicit or not (checkpoint / SCHEMA_FILE).is_file():
        written = save_schema(scratch / "schema", schema, source="blockpilot export")
        writer.add_file(written, "model")


@dataclass(frozen=True)
class ExportSource:
    """What ``export --checkpoint`` names: the ``checkpoint`` to load, the ``recipe`` its graphs are exported in
    (``None``: fp32) and, for what ``blockpilot quantize`` wrote, its directory (``quantized``), restored onto
    the checkpoint's float32 model instead of quantizing again."""

    checkpoint: Path
    recipe: str | None
    quantized: Path | None = None


def export_source(checkpoint: str | Path, recipe: str | None) -> ExportSource:
    """Resolve ``--checkpoint`` (a checkpoint, or a quantize output: :func:`blockpilot.runtime.sources.detect_source`)
    with ``--recipe``. A quantize output exports in its own recipe, which a bundle must carry (fp8 today); a
    ``--recipe`` beside it must name the same one. Raises :class:`BundleError` naming the path."""
    from ..runtime.sources import QUANTIZED_MAP, QUANTIZED_SUBDIR, PlannerSourceError, detect_source

    root = Path(checkpoint)
    if not any((d / QUANTIZED_MAP).is_file() for d in (root, root / QUANTIZED_SUBDIR)):
        return ExportSource(root, recipe)  # a checkpoint, or what the checkpoint checks refuse, naming the file
    try:
        found = detect_source(checkpoint, kinds=("checkpoint", "quantized"), flag="--checkpoint")
    except PlannerSourceError as exc:
        raise BundleError(str(exc)) from None
    assert found.quantized is not None and found.checkpoint is not None
    from ..quant.apply import QuantizedCheckpointError, read_precision_file

    try:
        saved = read_precision_file(found.quantized).get("recipe") or {}
    except QuantizedCheckpointError as exc:
        raise BundleError(str(exc)) from None
    name = saved.get("name") if isinstance(saved, dict) else None
    if recipe is not None and recipe != name:
        raise BundleError(f"--checkpoint {found.path}: quantized with recipe {name!r}; --recipe {recipe} would "
                          "quantize again (leave --recipe out to export it as it is)")
    if name != "fp8":
        raise BundleError(f"--checkpoint {found.path}: quantized with recipe {name!r}; bundles carry fp32 or fp8 "
                          "graphs today (quantize with --recipe fp8 to export it)")
    return ExportSource(found.checkpoint, name, found.quantized)
