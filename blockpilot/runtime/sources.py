"""What a :class:`~blockpilot.runtime.planner.Planner` opens from, found by looking: a checkpoint directory, a
bundle directory, or what ``blockpilot quantize`` writes; :func:`open_planner` builds a ready planner from any.

A quantize output (``precision_map.json`` beside ``modelopt_state.pth`` and ``quantized_weights.pth``, in the
``--out`` directory's ``quantized/``) records the checkpoint it was made from; it plans on the torch backend as that
checkpoint with the saved quantizers restored. The restoring is Model Optimizer's and lives in
:mod:`blockpilot.quant`, which the runtime never imports: the caller passes it as ``restore_quantized`` (the
``blockpilot`` commands do). Torch-free until a checkpoint is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import BACKENDS, BUNDLE_BACKENDS, CHECKPOINT_BACKENDS
from .plan_types import DecoderSettings, PlannerSetupError

if TYPE_CHECKING:
    from ..vla.plans import PlanSchema
    from .planner import Planner

SOURCE_KINDS = ("checkpoint", "bundle", "quantized")
QUANTIZED_SUBDIR = "quantized"  # where `blockpilot quantize --out DIR` writes (DIR/quantized/)
QUANTIZED_MAP = "precision_map.json"
# Restores a quantize output onto a freshly loaded full-precision model: (model, directory) -> model.
RestoreQuantized = Callable[[Any, Path], Any]


class PlannerSourceError(PlannerSetupError):
    """A planner source is none of a checkpoint, a bundle and a quantize output, or not one a command takes;
    the message names the path."""


@dataclass(frozen=True)
class PlannerSource:
    """A detected source: its ``kind`` (one of :data:`SOURCE_KINDS`), the ``path`` given, and for a quantize
    output the directory holding its files (``quantized``) and the checkpoint it records (``checkpoint``)."""

    kind: str
    path: Path
    checkpoint: Path | None = None
    quantized: Path | None = None

    @property
    def default_backend(self) -> str:
        return "onnxruntime" if self.kind == "bundle" else "torch"

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this source runs on."""
        return {"checkpoint": CHECKPOINT_BACKENDS, "bundle": BUNDLE_BACKENDS, "quantized": ("torch",)}[self.kind]


def detect_source(path: str | Path, *, kinds: Sequence[str] = SOURCE_KINDS, flag: str = "source") -> PlannerSource:
    """What ``path`` is: a bundle (``manifest.json``), a quantize output (``precision_map.json`` in it or in its
    ``quantized/``) or a checkpoint (``config.json``). Raises :class:`PlannerSourceError` naming ``flag`` and
    the path when it is none of these or not one of ``kinds``."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise PlannerSourceError(f"{flag} {root}: {what}")
    found = _detect(root)
    if found is None:
        raise PlannerSourceError(f"{flag} {root}: not a checkpoint (config.json), a bundle (manifest.json) or a "
                                 f"quantize output ({QUANTIZED_MAP}, or {QUANTIZED_SUBDIR}/{QUANTIZED_MAP})")
    if found.kind not in kinds:
        raise PlannerSourceError(f"{flag} {root}: a {_WORDS[found.kind]}; this takes a "
                                 f"{' or a '.join(_WORDS[k] for k in kinds)}")
    return found


_WORDS = {"checkpoint": "checkpoint", "bundle": "bundle", "quantized": "quantize output"}


def _detect(root: Path) -> PlannerSource | None:
    if (root / "manifest.json").is_file():
        return PlannerSource("bundle", root)
    for quantized in (root, root / QUANTIZED_SUBDIR):
        if (quantized / QUANTIZED_MAP).is_file():
            return PlannerSource("quantized", root, _recorded_checkpoint(quantized / QUANTIZED_MAP), quantized)
    if (root / "config.json").is_file():
        return PlannerSource("checkpoint", root, root)
    return None


def _map_entry(map_file: Path, key: str) -> Any:
    """``key`` of a quantize output's precision map (``None`` when absent); an unreadable map names the file."""
    try:
        info = json.loads(map_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlannerSourceError(f"{map_file}: unreadable ({exc})") from exc
    return info.get(key) if isinstance(info, dict) else None


def recorded_schema(map_file: Path) -> Any:
    """The answer schema a quantize output records (``None``: it records none, plan in the checkpoint's own)."""
    from ..vla.config import ConfigError
    from ..vla.schema_io import schema_from_dict

    stored = _map_entry(map_file, "schema")
    if stored is None:
        return None
    try:
        return schema_from_dict(stored, f"{map_file}: schema") if isinstance(stored, dict) else \
            schema_from_dict({}, f"{map_file}: schema")
    except ConfigError as exc:
        raise PlannerSourceError(str(exc)) from exc


def _recorded_checkpoint(map_file: Path) -> Path:
    recorded = _map_entry(map_file, "checkpoint")
    if not isinstance(recorded, str) or not recorded:
        raise PlannerSourceError(f"{map_file}: records no source checkpoint (written by an older quantize); "
                                 "quantize the checkpoint again")
    checkpoint = Path(recorded)
    if not (checkpoint / "config.json").is_file():
        raise PlannerSourceError(f"{map_file}: the checkpoint it was quantized from, {checkpoint}, is not a "
                                 "checkpoint directory here (moved?); quantize the checkpoint again")
    return checkpoint


def open_planner(source: str | Path | PlannerSource, *, backend: str = "auto", decoder: DecoderSettings | None = None,
                 schema: PlanSchema[Any] | None = None, device: str = "cpu", dtype: str = "float32",
                 max_prompt_tokens: int | None = None, cameras: int = 1, image_hw: tuple[int, int] | None = None,
                 threads: int = 1, verify: bool = True, kinds: Sequence[str] = SOURCE_KINDS,
                 restore_quantized: RestoreQuantized | None = None, flag: str = "source",
                 trusted_keys: Sequence[str | Path] = ()) -> Planner:
    """A ready planner from a checkpoint, a bundle or a quantize output (:func:`detect_source`).

    ``backend``: ``auto`` (torch for a checkpoint or a quantize output, onnxruntime for a bundle) or one of
    :data:`~blockpilot.runtime.backend.BACKENDS` the source runs on. A checkpoint takes ``schema``, ``device``,
    ``dtype``, ``cameras`` and ``image_hw`` (:meth:`Planner.from_checkpoint`); a bundle ``threads`` and ``verify``
    (:func:`~blockpilot.runtime.bundle_planner.planner_from_bundle`) and answers in its own schema. A quantize
    output loads its checkpoint in float32 and needs ``restore_quantized``. ``trusted_keys`` (public key files):
    only a bundle signed by one of them runs (a checkpoint or quantize output is refused). ``kinds`` limits what is
    accepted; ``flag`` names the option in errors. Raises :class:`PlannerSetupError` (:class:`PlannerSourceError`
    about the source itself)."""
    found = source if isinstance(source, PlannerSource) else detect_source(source, kinds=kinds, flag=flag)
    chosen = found.default_backend if backend == "auto" else backend
    if chosen not in BACKENDS:
        raise PlannerSetupError(f"backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    if chosen not in found.backends:
        raise PlannerSourceError(f"{flag} {found.path}: a {_WORDS[found.kind]} runs on "
                                 f"{' or '.join(found.backends)}, not {chosen}" +
                                 ("; export a bundle first (blockpilot export)" if found.kind != "bundle" else ""))
    if trusted_keys and found.kind != "bundle":
        raise PlannerSourceError(f"{flag} {found.path}: a {_WORDS[found.kind]} carries no signature; trusted keys "
                                 "accept only a bundle signed by one of them (blockpilot export --sign)")
    if found.kind == "bundle":
        if schema is not None:
            raise PlannerSourceError(f"{flag} {found.path}: a bundle answers in the schema it was exported with; "
                                     "a schema applies to a checkpoint")
        from .bundle_planner import planner_from_bundle

        return planner_from_bundle(found.path, decoder=decoder, backend=chosen, threads=threads, verify=verify,
                                   max_prompt_tokens=max_prompt_tokens, trusted_keys=trusted_keys)
    from .planner import Planner

    assert found.checkpoint is not None
    if found.kind == "quantized":
        if restore_quantized is None:
            raise PlannerSourceError(f"{flag} {found.path}: a quantize output; plan it with blockpilot plan or "
                                     "eval, or export it to a bundle (blockpilot export --checkpoint "
                                     f"{found.path})")
        if dtype not in ("float32", "auto"):
            raise PlannerSourceError(f"{flag} {found.path}: a quantize output plans in float32 (its quantizers were "
                                     f"calibrated on the float32 model), not {dtype}")
        dtype = "float32"
        if schema is None and found.quantized is not None:  # quantized for (quantize --schema), else its own
            schema = recorded_schema(found.quantized / QUANTIZED_MAP)
    planner = Planner.from_checkpoint(found.checkpoint, decoder=decoder, schema=schema, backend=chosen,
                                      device=device, dtype=dtype, max_prompt_tokens=max_prompt_tokens,
                                      cameras=cameras, image_hw=image_hw)
    if found.kind == "quantized":
        assert restore_quantized is not None and found.quantized is not None
        try:
            restore_quantized(planner.backend.model, found.quantized)  # type: ignore[attr-defined]
        except ValueError as exc:  # QuantizedCheckpointError names the file
            raise PlannerSourceError(str(exc)) from exc
    return planner
