"""The reference model shipped in models/reference loads through the normal path and plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "reference"


def test_shipped_checkpoint_is_small_and_complete() -> None:
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "blockpilot.json", "DATA_CARD.md"} <= names
    assert (SHIPPED / "model.safetensors").stat().st_size <= 20 * 2**20


def test_shipped_model_plans_a_heldout_scene_with_scaffold_and_ar_alike() -> None:
    frame = heldout_keyframes(1, stride=8)[1]
    plans = [Planner.from_checkpoint(SHIPPED, decoder=DecoderSettings(name=name)).plan(observation(frame))
             for name in ("scaffold", "ar")]
    scaffold, ar = plans
    assert scaffold.error is None and scaffold.waypoints is not None
    assert scaffold.text == ar.text  # lossless against the AR baseline
    assert scaffold.stats.forwards < ar.stats.forwards
    assert np.isfinite(scaffold.waypoints).all() and scaffold.waypoints.shape == (6, 2)
