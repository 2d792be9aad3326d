from __future__ import annotations

import math

import numpy as np

from blockpilot.eval.synthetic import HELDOUT_SEED_BASE, evaluate, heldout_keyframes, observation
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.vla.reference_model import build_reference_model


def test_heldout_keyframes_are_valid_and_unseen() -> None:
    frames = heldout_keyframes(2, stride=8)
    assert frames and all(k.future_valid for k in frames)
    assert all(int(k.scene_name.split("-")[-1]) >= HELDOUT_SEED_BASE for k in frames)
    obs = observation(frames[0])
    assert obs.route_command == frames[0].route_command
    np.testing.assert_array_equal(obs.ego.past_waypoints, frames[0].past_xy)
    assert obs.images[0].shape == (112, 112, 3)


def test_evaluate_counts_every_sample_and_only_scores_parsed_plans() -> None:
    model, tokenizer = build_reference_model(seed=0, std=0.3)
    planner = Planner.from_model(model, tokenizer, decoder=DecoderSettings(name="scaffold"))
    frames = heldout_keyframes(1, stride=12)
    report = evaluate(planner, frames)
    assert report.samples == len(frames)
    assert 0 <= report.parsed <= report.samples
    assert report.forwards_per_plan > 1 and report.tokens_per_forward >= 1.0
    if report.parsed == 0:  # random weights rarely produce a parseable answer
        assert math.isnan(report.l2_3s_model) and math.isnan(report.l2_3s_cv)
    else:
        assert report.l2_3s_cv >= 0 and report.l2_avg_model >= 0
