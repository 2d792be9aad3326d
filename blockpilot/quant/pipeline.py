"""From a checkpoint and a recipe to a saved quantized model: target gate, calibration set, modelopt
(``mtq.quantize`` or ``mtq.auto_quantize``), precision map, save; the planner around the result.

The model is quantized inside a :class:`~blockpilot.runtime.planner.Planner`, so calibration runs the
same prompt, vision and block-diffusion attention patterns the car runs: ``calib_mode="teacher"`` (the
default) in one packed forward per sample (:mod:`blockpilot.calibration.teacher`), ``"decode"`` as a
full planned decode per sample (:mod:`blockpilot.calibration.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import build_calibration_set
from ..calibration.loop import calibration_batches, make_forward_loop, planner_model
from ..calibration.robot import check_calibration_matches
from ..calibration.teacher import make_teacher_loop
from ..eval.types import Source
from ..runtime.plan_types import DecoderSettings
from ..runtime.planner import Planner
from ..runtime.sources import QUANTIZED_SUBDIR, open_planner
from ..vla.schema_io import schema_to_dict
from .apply import QuantReport, is_emulated, load_quantized, modelopt_version, quantize_model, save_quantized
from .auto import auto_quantize_model
from .recipes import Recipe, RecipeError, quantizable_modules
from .targets import Target, check_recipe

QUANTIZED_DIR = QUANTIZED_SUBDIR  # what quantize writes, where open_planner looks for it
CALIB_MODES = ("teacher", "decode")
DEFAULT_CALIB_MODE = "teacher"


@dataclass
class QuantizeOutcome:
    planner: Planner  # around the quantized model
    report: QuantReport
    notes: list[str]
    saved: Path
    calibration: dict[str, Any]
    auto: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_planner(source: Path, decoder: DecoderSettings, device: str = "cpu", max_prompt_tokens: int = 1024,
                 schema: Any = None, *, kinds: tuple[str, ...] = ("checkpoint", "quantized")) -> Planner:
    """A torch planner on ``source`` (:func:`~blockpilot.runtime.sources.open_planner`): a checkpoint, or what
    :func:`quantize_checkpoint` wrote, restored onto its checkpoint (:func:`~blockpilot.quant.apply.load_quantized`)."""
    return open_planner(source, decoder=decoder, device=device, max_prompt_tokens=max_prompt_tokens, schema=schema,
                        kinds=kinds, restore_quantized=load_quantized, flag="--checkpoint")


def quantize_planner(planner: Planner, recipe: Recipe, calib_source: Source, calib_size: int, *,
                     target: Target | str = "cpu", allow_emulated: bool = False, cache_dir: Path | None = None,
                     progress: bool = False, calib_mode: str = DEFAULT_CALIB_MODE,
                     ) -> tuple[QuantReport, list[str], dict[str, Any], dict[str, Any] | None]:
    """Quantize ``planner``'s model in place: (report, target notes, calibration manifest, auto result).
    ``calib_mode``: ``teacher`` (one packed forward per sample) or ``decode`` (a planned decode per sample);
    the auto recipe scores layers on its own teacher-forced causal batches either way."""
    if calib_mode not in CALIB_MODES:
        raise RecipeError(f"calib_mode must be one of {CALIB_MODES}, got {calib_mode!r}")
    model = planner_model(planner)
    notes = check_recipe(recipe, target, allow_emulated=allow_emulated, module_names=model)
    calib = build_calibration_set(calib_source, calib_size, cache_dir=cache_dir)
    check_calibration_matches(planner.schema, calib)  # driving scenes never calibrate an action-chunk model
    auto_result: dict[str, Any] | None = None
    loop_stats: dict[str, Any] | None = None
    if recipe.auto is not None:
        if recipe.kv_cache is not None:
            raise RecipeError("the auto recipe searches weight formats only; run it without kv_cache")
        kwargs = recipe.auto_quantize_kwargs()
        batches = calibration_batches(planner, calib)
        result = auto_quantize_model(model, formats=kwargs["quantization_formats"],
                                     effective_bits=float(kwargs["constraints"]["effective_bits"]),
                                     batches=batches, disabled_layers=kwargs["disabled_layers"])
        auto_result = result.to_dict()
        report = QuantReport(result.precision, {"auto": recipe.to_dict()}, is_emulated(model, result.precision),
                             modelopt_version())
    else:
        loop: Any = (make_teacher_loop(planner, calib, progress=progress) if calib_mode == "teacher"
                     else make_forward_loop(planner, calib, progress=progress))  # built before any quantizer
        report = quantize_model(model, recipe.modelopt_config(quantizable_modules(model)), loop)
        loop_stats = {"mode": calib_mode, **loop.stats.to_dict()}
    manifest = {k: calib.manifest.get(k) for k in ("cache_key", "content_hash", "selected", "strata", "source")}
    manifest["from_cache"] = calib.from_cache
    manifest["mode"] = "auto" if recipe.auto is not None else calib_mode
    manifest["loop"] = loop_stats
    return report, notes, manifest, auto_result


def quantize_checkpoint(checkpoint: Path, recipe: Recipe, calib_source: Source, calib_size: int, out_dir: Path, *,
                        target: Target | str = "cpu", allow_emulated: bool = False,
                        decoder: DecoderSettings | None = None, device: str = "cpu",
                        cache_dir: Path | None = None, progress: bool = False, schema: Any = None,
                        calib_mode: str = DEFAULT_CALIB_MODE) -> QuantizeOutcome:
    """Load ``checkpoint`` into a planner, quantize it with ``recipe`` and save it in ``out_dir/quantized``
    (``schema``: the answer schema, default the checkpoint's own). Refuses before loading when the float32 model and
    its quantizers would not fit this machine's memory (:class:`~blockpilot.vla.memory_budget.MemoryBudgetError`)."""
    from ..vla.memory_budget import check_fits

    check_fits(checkpoint, ("load", "quantize"), "float32", what=f"quantize --recipe {recipe.name}")
    planner = load_planner(checkpoint, decoder or DecoderSettings(name="scaffold"), device, schema=schema,
                           kinds=("checkpoint",))
    report, notes, manifest, auto_result = quantize_planner(
        planner, recipe, calib_source, calib_size, target=target, allow_emulated=allow_emulated,
        cache_dir=cache_dir, progress=progress, calib_mode=calib_mode)
    target_name = target if isinstance(target, str) else target.name
    answers: Any = planner.schema  # recorded: open_planner answers in it (a --schema given here included)
    extra = {"recipe": recipe.to_dict(), "target": target_name, "target_notes": notes, "calibration": manifest,
             "checkpoint": str(Path(checkpoint).resolve()), "auto_search": auto_result,
             "schema": schema_to_dict(answers)}
    saved = save_quantized(planner_model(planner), out_dir / QUANTIZED_DIR, report, extra=extra)
    return QuantizeOutcome(planner, report, notes, saved, manifest, auto_result, extra)
