"""Teacher-forced calibration: the packed layout's two attention patterns, forwards identical to the
decoder's causal verify and bidirectional draft, ground-truth answers through the schema, every
quantizer calibrated (vision and text-only models), the cache keeping the future, the CLI option."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blockpilot.calibration import CalibrationError, build_calibration_set, synthetic_calibration_source
from blockpilot.calibration.answers import resample_future, truth_plan, truth_tokens
from blockpilot.calibration.teacher import CLEAN, draft_windows, make_teacher_loop, noisy_ids, packed_layout
from blockpilot.cli import main
from blockpilot.eval.types import Trajectory
from blockpilot.quant.apply import iter_quantizers
from blockpilot.quant.pipeline import quantize_planner
from blockpilot.quant.recipes import resolve_recipe
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.runtime.planner import Planner
from blockpilot.vla.model import VLAModel, rope_continuation
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.plans import DrivingSchema
from blockpilot.vla.reference_model import SHIPPED_MODEL, init_weights, reference_config
from blockpilot.vla.reference_tokenizer import build_reference_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib_source() -> object:
    return synthetic_calibration_source(1, duration_s=8.0)


@pytest.fixture(scope="module")
def calib(calib_source: object, tmp_path_factory: pytest.TempPathFactory) -> object:
    return build_calibration_set(calib_source, 3, cache_dir=tmp_path_factory.mktemp("calib"))  # type: ignore[arg-type]


def test_packed_layout_is_causal_for_the_clean_sequence_and_bidirectional_inside_each_window() -> None:
    # prompt of 3, answer of 5, windows [0, 2) and [2, 5): T = 8 + 2 + 3
    layout = packed_layout(3, 5, [(0, 2), (2, 5)], AttentionMode.CAUSAL, 4)
    m = layout.mask
    assert m.shape == (13, 13) and layout.clean_queries == 8 and layout.draft_queries == 5
    assert layout.slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 6, 7]
    assert layout.window.tolist() == [CLEAN] * 8 + [0, 0, 1, 1, 1]
    assert torch.equal(m[:8, :8], torch.tril(torch.ones(8, 8, dtype=torch.bool)))  # clean: causal
    assert not m[:8, 8:].any()  # the clean sequence never sees a noisy copy
    # window 0 (slots 3, 4): the prompt before it and both of its own positions, nothing else
    assert m[8].tolist() == [True] * 3 + [False] * 5 + [True, True, False, False, False]
    assert torch.equal(m[8], m[9])
    # window 1 (slots 5..7): the clean slots before 5 and itself, not window 0's noisy copy
    assert m[10].tolist() == [True] * 5 + [False] * 3 + [False, False, True, True, True]
    # block-causal clean sequence (Fast-dLLM v2 commits): bidirectional inside absolute blocks of 4
    block = packed_layout(3, 5, [(0, 1), (1, 5)], AttentionMode.BLOCK, 4).mask
    assert block[1, 3] and not block[1, 4] and block[4, 7] and not block[3, 4]
    with pytest.raises(CalibrationError, match="outside the answer"):
        packed_layout(3, 5, [(4, 6)], AttentionMode.CAUSAL, 4)


def test_noisy_windows_mask_values_but_keep_structure_and_the_seeded_first_token() -> None:
    answer = np.array([10, 11, 12, 13, 14, 15])
    frozen = np.array([True, False, False, True, False, False])
    assert noisy_ids(answer, frozen, [(0, 3), (3, 6)], 99).tolist() == [10, 99, 99, 13, 99, 99]
    assert noisy_ids(answer, frozen, [(1, 3)], 99).tolist() == [11, 99]  # a value slot opening a window is seeded


def test_one_packed_forward_equals_the_decoders_causal_verify_and_bidirectional_draft(calib: object) -> None:
    planner = Planner.from_checkpoint(SHIPPED_MODEL)
    loop = make_teacher_loop(planner, calib)  # type: ignore[arg-type]
    sample = next(s for s in loop.samples if s.source == "truth")
    model, backend = planner.backend.model, planner.backend  # type: ignore[attr-defined]
    seen: list[torch.Tensor] = []
    hook = model.lm.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["attn_mask"]), with_kwargs=True)
    try:
        with torch.inference_mode():
            hidden, layout = loop.forward(sample)
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0].shape == (len(layout.slots),) * 2  # one forward, the packed mask
    p, a = len(sample.prompt), len(sample.answer)
    windows = draft_windows(planner, p, a)
    # Both attention patterns among the queries: causal (no later key) and bidirectional (a later key).
    later = (seen[0] & (layout.slots[None, :] > layout.slots[:, None])).any(1)
    assert not later[:p + a].any() and later[p + a:].sum() >= len(windows) > 1
    with torch.inference_mode():  # the decode path: causal prefill + verify, then one window's draft
        backend.prefill(sample.prompt)
        delta = backend._rope_delta
        verify = model(torch.from_numpy(sample.answer)[None], position_ids=rope_continuation(p, a, delta),
                       cache=backend._cache, start=p, mode=AttentionMode.CAUSAL)
        assert torch.allclose(hidden[0, p:p + a], verify[0], atol=1e-4)
        lo, hi = windows[1]
        ids = noisy_ids(sample.answer, planner.scaffold.frozen, [(lo, hi)], planner.config.tokens.mask)
        assert (ids == planner.config.tokens.mask).any()
        draft = model(torch.from_numpy(ids)[None], position_ids=rope_continuation(p + lo, hi - lo, delta),
                      cache=backend._cache, start=p + lo, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
        at = p + a + (windows[0][1] - windows[0][0])
        assert torch.allclose(hidden[0, at:at + hi - lo], draft[0], atol=1e-4)


def test_ground_truth_renders_through_the_schema() -> None:
    schema = DrivingSchema.nuscenes()
    times = np.arange(1, 9) * 0.5
    future = Trajectory(times, np.column_stack([times * 8.0, 0.1 * times]), np.ones(8, dtype=bool))
    plan = truth_plan(future, 8.0, schema)
    assert plan is not None and plan.longitudinal == "keep_speed" and plan.lateral == "straight"
    assert np.allclose(plan.waypoints, np.column_stack([times[:6] * 8.0, 0.1 * times[:6]]))
    assert not any(plan.critical_objects.values())
    stopping = Trajectory(times, np.column_stack([np.minimum(times, 1.0) * 4.0, 0 * times]), np.ones(8, dtype=bool))
    assert truth_plan(stopping, 4.0, schema).longitudinal == "stop"  # type: ignore[union-attr]
    short = Trajectory(times, future.xy, times <= 2.0)  # the recording ends before the 3 s horizon
    assert resample_future(short, schema.waypoint_times_s) is None and truth_plan(short, 8.0, schema) is None
    assert truth_plan(None, 8.0, schema) is None
    planner = Planner.from_checkpoint(SHIPPED_MODEL)
    ids = truth_tokens(planner.scaffold, future, 8.0)
    assert ids is not None and ids.shape == planner.scaffold.token_ids.shape
    frozen = planner.scaffold.frozen
    assert np.array_equal(ids[frozen], planner.scaffold.token_ids[frozen])
    parsed = planner.scaffold.decode_plan(ids)
    assert np.allclose(parsed.waypoints, plan.waypoints, atol=0.006)


def test_calibration_cache_keeps_the_future(calib: object, calib_source: object, tmp_path: Path) -> None:
    first = build_calibration_set(calib_source, 3, cache_dir=tmp_path)  # type: ignore[arg-type]
    again = build_calibration_set(calib_source, 3, cache_dir=tmp_path)  # type: ignore[arg-type]
    assert again.from_cache and again.content_hash == first.content_hash
    assert any(s.future is not None for s in again.samples)
    for a, b in zip(first.samples, again.samples, strict=True):
        assert (a.future is None) == (b.future is None)
        if a.future is not None and b.future is not None:
            assert np.array_equal(a.future.xy, b.future.xy) and np.array_equal(a.future.valid, b.future.valid)


def _amax_everywhere(model: torch.nn.Module) -> int:
    enabled = [(name, role, q) for name, role, q in iter_quantizers(model) if getattr(q, "is_enabled", False)]
    for name, role, q in enabled:
        amax = getattr(q, "amax", None)
        assert amax is not None, f"{name}.{role}_quantizer was never calibrated"
        assert torch.isfinite(amax).all() and (amax > 0).all(), f"{name}.{role}_quantizer amax {amax}"
    return len(enabled)


def test_teacher_mode_calibrates_every_quantizer_of_the_vision_model(calib_source: object, tmp_path: Path) -> None:
    planner = Planner.from_checkpoint(SHIPPED_MODEL)
    report, _, manifest, _ = quantize_planner(planner, resolve_recipe("fp8"), calib_source, 3,  # type: ignore[arg-type]
                                              cache_dir=tmp_path, calib_mode="teacher")
    loop = manifest["loop"]
    assert manifest["mode"] == "teacher" and loop["forwards"] == 3 and loop["calls"] == 1
    assert loop["causal_queries"] > 0 and loop["draft_queries"] > 0 and loop["answer_sources"]["truth"] >= 1
    model = planner.backend.model  # type: ignore[attr-defined]
    assert _amax_everywhere(model) == 2 * report.quantized_modules > 0
    assert any(name.startswith("visual.") for name in report.precision)  # the vision tower saw its images
    with pytest.raises(CalibrationError, match=r"quantize planner\.backend\.model"):
        make_teacher_loop(planner, build_calibration_set(calib_source, 1, cache_dir=tmp_path))(  # type: ignore[arg-type]
            torch.nn.Linear(2, 2))


def test_teacher_mode_on_a_text_only_model(calib_source: object, tmp_path: Path) -> None:
    tokenizer, tokens = build_reference_tokenizer()
    config = reference_config(tokenizer.vocab_size, tokens)
    config = dataclasses.replace(config, vision=None, architecture="qwen2",
                                 lm=dataclasses.replace(config.lm, mrope_section=None))
    model = VLAModel(config).eval()
    init_weights(model, 0.3, 0)
    planner = Planner.from_model(model, tokenizer, max_prompt_tokens=256)
    seen: list[torch.Tensor] = []
    hook = model.lm.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        report, _, manifest, _ = quantize_planner(planner, resolve_recipe("fp8"), calib_source, 2,  # type: ignore[arg-type]
                                                  cache_dir=tmp_path, calib_mode="teacher")
    finally:
        hook.remove()
    assert manifest["loop"]["forwards"] == 2 and all(p is None or p.dim() == 2 for p in seen)  # 1-D RoPE: no image
    assert _amax_everywhere(model) == 2 * report.quantized_modules > 0
    assert not any(name.startswith("visual.") for name in report.precision)


def test_block_decoder_windows_follow_absolute_blocks() -> None:
    planner = Planner.from_checkpoint(SHIPPED_MODEL, decoder=DecoderSettings(name="block"))
    block = planner.settings.block_size
    assert block is not None
    windows = draft_windows(planner, 70, 100)
    assert windows[0] == (0, -70 % block) and all((70 + a) % block == 0 for a, _ in windows[1:])
    assert windows[-1][1] == 100 and all(b - a <= block for a, b in windows)


def test_cli_calib_mode_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["quantize", "--checkpoint", str(SHIPPED_MODEL), "--recipe", "fp8", "--calib", "2", "--calib-scenes", "1",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "t")]) == 0
    assert "teacher mode: 2 packed forwards" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "d"), "--calib-mode", "decode"]) == 0
    assert "decode mode" in capsys.readouterr().out
    info = json.loads((tmp_path / "d" / "quantized" / "precision_map.json").read_text())
    assert info["calibration"]["mode"] == "decode" and info["calibration"]["loop"]["forwards"] > 2
