"""Calibration sets drawn from replay sources, and the forward loop that calibrates a planner's model.

``blockpilot.calibration.sets`` is torch-free; the loop names (which need torch) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .sets import (
    CALIBRATION_SEED_BASE,
    DEFAULT_SPEED_BINS,
    FORMAT_VERSION,
    CalibrationError,
    CalibrationSample,
    CalibrationSet,
    build_calibration_set,
    cache_key,
    content_hash,
    default_cache_dir,
    select_samples,
    speed_bin_labels,
)
from .synthetic import SyntheticCalibrationSource, synthetic_calibration_source

if TYPE_CHECKING:
    from .loop import (
        ForwardLoop,
        LoopStats,
        answer_loss,
        calibration_batches,
        forward_step,
        make_forward_loop,
        planner_model,
    )

_LOOP_NAMES = ("ForwardLoop", "LoopStats", "answer_loss", "calibration_batches", "forward_step",
               "make_forward_loop", "planner_model")

__all__ = [
    "CALIBRATION_SEED_BASE",
    "DEFAULT_SPEED_BINS",
    "FORMAT_VERSION",
    "CalibrationError",
    "CalibrationSample",
    "CalibrationSet",
    "ForwardLoop",
    "LoopStats",
    "SyntheticCalibrationSource",
    "answer_loss",
    "build_calibration_set",
    "cache_key",
    "calibration_batches",
    "content_hash",
    "default_cache_dir",
    "forward_step",
    "make_forward_loop",
    "planner_model",
    "select_samples",
    "speed_bin_labels",
    "synthetic_calibration_source",
]


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
