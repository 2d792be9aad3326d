"""Calibration sets (stratification, cache, sources) and the calibration forward loop.

The hand-made source has known strata (ROUTE_COMMANDS order: turn left, go straight, turn right):
turn left [2,6) 3 samples (one whose images fail), go straight [0,2) 10, go straight [6,10) 10,
turn right [10,inf) 10, plus 2 broken and 1 skipped items and one with an unknown command. Drawing
11 round-robin: round 1 and 2 take one from each stratum (8), then turn left is exhausted (its third
candidate fails to load), so round 3 takes one from each of the other three: 2 / 3 / 3 / 3.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from blockpilot.calibration import (
    CALIBRATION_SEED_BASE,
    CalibrationError,
    CalibrationSet,
    answer_loss,
    build_calibration_set,
    cache_key,
    calibration_batches,
    default_cache_dir,
    forward_step,
    make_forward_loop,
    select_samples,
    synthetic_calibration_source,
)
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.nuscenes import NuScenesSource
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE
from blockpilot.eval.types import EvalSample, SampleError, SampleFailure
from blockpilot.runtime.plan_types import Observation, Plan
from blockpilot.runtime.planner import Planner
from blockpilot.sim.generator import generate_scene
from blockpilot.sim.writers.nuscenes import write_nuscenes
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.prompt import EgoState

pytestmark = pytest.mark.usefixtures("one_thread")

Item = EvalSample | SampleFailure


class FakeSource:
    name = "fake"

    def __init__(self, items: list[Item], tag: str = "a") -> None:
        self.items, self.tag = items, tag

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {"tag": self.tag, "items": len(self.items)}


def fake_sample(i: int, speed: float, command: str, loads: Counter[str], fail: bool = False) -> EvalSample:
    sid = f"fake/{i:03d}"

    def load() -> list[np.ndarray]:
        loads[sid] += 1
        if fail:
            raise SampleError(f"{sid}: CAM_FRONT.jpg is truncated")
        return [np.full((4, 6, 3), i, np.uint8)]

    return EvalSample(sample_id=sid, source="fake", scene="log", timestamp_us=i * 500_000,
                      ego=EgoState(np.zeros((4, 2)), speed, 0.0), route_command=command, load_images=load,
                      future=None)


def fake_items(loads: Counter[str]) -> list[Item]:
    items: list[Item] = [fake_sample(i, 4.0, "turn left", loads, fail=i == 1) for i in range(3)]
    items += [fake_sample(10 + i, 1.0, "go straight", loads) for i in range(10)]
    items += [fake_sample(20 + i, 8.0, "go straight", loads) for i in range(10)]
    items += [fake_sample(30 + i, 12.0, "turn right", loads) for i in range(10)]
    items += [SampleFailure("fake/bad0", "fake", "log", "broken record"),
              SampleFailure("fake/bad1", "fake", "log", "non-finite pose"),
              SampleFailure("fake/early", "fake", "log", "needs 2.0 s of history", kind="skipped"),
              fake_sample(99, 3.0, "u-turn", loads)]
    return items


def selected_per_stratum(manifest: dict[str, Any]) -> dict[str, int]:
    return {k: v["selected"] for k, v in manifest["strata"].items()}


def assert_even(manifest: dict[str, Any]) -> None:
    """Strata with candidates left differ by at most one; exhausted ones hold no more than those."""
    strata = manifest["strata"].values()
    open_counts = [s["selected"] for s in strata if s["selected"] < s["available"]]
    if open_counts:
        assert max(open_counts) - min(open_counts) <= 1
        assert all(s["selected"] <= max(open_counts) for s in strata)


def test_stratified_draw_is_even_skips_failures_and_loads_only_chosen_images() -> None:
    loads: Counter[str] = Counter()
    samples, facts = select_samples(FakeSource(fake_items(loads)), 11, seed=0)
    assert len(samples) == 11 and facts["selected"] == 11
    assert selected_per_stratum(facts) == {"turn left [2,6)": 2, "go straight [0,2)": 3,
                                           "go straight [6,10)": 3, "turn right [10,inf)": 3}
    assert facts["failures"] == {"source_error": 2, "source_skipped": 1, "invalid": 1, "image_error": 1}
    assert facts["items_seen"] == 37 and facts["usable"] == 33
    assert any("truncated" in e for e in facts["failure_examples"])
    # images were decoded for the chosen samples and the one failing candidate only, once each
    assert set(loads) == {s.sample_id for s in samples} | {"fake/001"}
    assert set(loads.values()) == {1}
    assert {s.speed_bin for s in samples if s.route_command == "turn right"} == {"[10,inf)"}
    assert samples[0].images[0].shape == (4, 6, 3) and not samples[0].images[0].flags.writeable


def test_draw_is_deterministic_seeded_and_spread_over_the_log() -> None:
    def ids(seed: int) -> list[str]:
        return [s.sample_id for s in select_samples(FakeSource(fake_items(Counter())), 11, seed=seed)[0]]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    first_three = {"fake/010", "fake/011", "fake/012"}
    picks = [{i for i in ids(seed) if "fake/010" <= i <= "fake/019"} for seed in range(5)]
    assert any(p != first_three for p in picks)  # not biased to the start of the log


def test_spent_spares_cost_another_pass_and_vanished_or_repeated_samples_are_counted() -> None:
    loads: Counter[str] = Counter()
    items: list[Item] = [fake_sample(i, 4.0, "turn left", loads, fail=i >= 2) for i in range(12)]
    items += [fake_sample(20 + i, 1.0, "go straight", loads) for i in range(10)]
    samples, facts = select_samples(FakeSource(items), 6)
    assert selected_per_stratum(facts) == {"turn left [2,6)": 2, "go straight [0,2)": 4}
    assert facts["failures"]["image_error"] == 10 and facts["source_passes"] == 3  # ids, quotas + spares, more
    assert sum(loads.values()) == 12 + 4 and set(loads.values()) == {1}
    assert [s.route_command for s in samples] == ["turn left", "go straight"] * 2 + ["go straight"] * 2

    class Shrinking(FakeSource):  # a source that loses a sample between passes
        passes = 0

        def __iter__(self) -> Iterator[Item]:
            self.passes += 1
            return iter(self.items if self.passes == 1 else [i for i in self.items if i.sample_id != lost])

    good: list[Item] = [fake_sample(30 + i, 8.0, "go straight", Counter()) for i in range(4)]
    lost = select_samples(FakeSource(good), 1)[0][0].sample_id
    samples, facts = select_samples(Shrinking([*good, good[0]]), 3)
    assert lost not in {s.sample_id for s in samples} and len(samples) == 3
    assert facts["failures"]["image_error"] == 1 and facts["failures"]["invalid"] == 1  # vanished; repeated id
    assert any("repeated" in e for e in facts["failure_examples"])


def test_speed_bins_and_sizes_are_checked() -> None:
    src = FakeSource(fake_items(Counter()))
    with pytest.raises(CalibrationError, match="positive"):
        build_calibration_set(src, 0)
    with pytest.raises(CalibrationError, match="increasing"):
        select_samples(src, 4, speed_bins=(0.0, 5.0, 5.0))
    samples, facts = select_samples(src, 40, speed_bins=(0.0,))
    assert facts["selected"] == len(samples) == 32  # every loadable sample once, short of 40
    assert set(facts["strata"]) == {"turn left [0,inf)", "go straight [0,inf)", "turn right [0,inf)"}


def test_a_source_without_usable_samples_is_an_error_naming_it(tmp_path: Path) -> None:
    loads: Counter[str] = Counter()
    items: list[Item] = [SampleFailure("fake/x", "fake", "log", "broken"), fake_sample(1, 3.0, "go straight", loads,
                                                                                        fail=True)]
    with pytest.raises(CalibrationError, match=r"'fake'.*'source_error': 1.*'image_error': 1"):
        build_calibration_set(FakeSource(items), 4, cache_dir=tmp_path)


def test_cache_hit_tamper_corruption_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: Counter[str] = Counter()
    src = FakeSource(fake_items(loads))
    first = build_calibration_set(src, 6, cache_dir=tmp_path, seed=3)
    assert not first.from_cache and first.rebuilt_reason is None and first.path is not None
    assert {p.name for p in first.path.iterdir()} == {"samples.npz", "manifest.json"}
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind
    loads.clear()
    second = build_calibration_set(src, 6, cache_dir=tmp_path, seed=3)
    assert second.from_cache and not loads
    assert second.content_hash == first.content_hash
    assert [s.sample_id for s in second.samples] == first.manifest["sample_ids"]
    for a, b in zip(first.samples, second.samples, strict=True):
        assert np.array_equal(a.images[0], b.images[0]) and a.ego.speed_mps == b.ego.speed_mps

    npz_path = first.path / "samples.npz"
    with np.load(npz_path) as npz:
        arrays = dict(npz)
    arrays["image_0_0"] = arrays["image_0_0"] ^ 1  # a valid archive with other pixels
    with open(npz_path, "wb") as f:
        np.savez_compressed(f, **arrays)
    rebuilt = build_calibration_set(src, 6, cache_dir=tmp_path, seed=3)
    assert not rebuilt.from_cache and rebuilt.rebuilt_reason is not None
    assert "content hash mismatch" in rebuilt.rebuilt_reason
    assert rebuilt.content_hash == first.content_hash and loads
    assert build_calibration_set(src, 6, cache_dir=tmp_path, seed=3).from_cache

    npz_path.write_bytes(b"PK\x03\x04 not a zip archive")
    broken = build_calibration_set(src, 6, cache_dir=tmp_path, seed=3)
    assert broken.rebuilt_reason is not None and "unreadable" in broken.rebuilt_reason
    assert broken.content_hash == first.content_hash

    assert cache_key(src, 6, 3) != cache_key(src, 7, 3) != cache_key(src, 6, 4)
    assert cache_key(src, 6, 3) != cache_key(FakeSource(src.items, tag="b"), 6, 3)
    assert cache_key(src, 6, 3) != cache_key(src, 6, 3, speed_bins=(0.0, 5.0))
    other = build_calibration_set(src, 7, cache_dir=tmp_path, seed=3)
    assert other.path != first.path and not other.from_cache and len(other) == 7

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "calibration"
    assert build_calibration_set(src, 6, seed=3).path == tmp_path / "env" / "calibration" / cache_key(src, 6, 3)


def test_synthetic_source_uses_its_own_seeds_and_stratifies(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="first_seed"):
        synthetic_calibration_source(2, first_seed=HELDOUT_SEED_BASE)
    src = synthetic_calibration_source(3, duration_s=8.0, keyframe_stride=1)
    calib = build_calibration_set(src, 8, cache_dir=tmp_path)
    assert len(calib) == 8 and calib.manifest["source"]["name"] == "synthetic"
    seeds = {int(s.sample_id.split("/")[1]) for s in calib.samples}
    assert seeds <= set(range(CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + 3))
    assert_even(calib.manifest)
    assert len(calib.manifest["strata"]) >= 2
    obs = calib.observations()[0]
    assert obs.images[0].ndim == 3 and obs.images[0].dtype == np.uint8 and obs.ego.past_waypoints.shape == (4, 2)


def test_nuscenes_source_over_a_written_dataroot(tmp_path: Path) -> None:
    scenes = [generate_scene(CALIBRATION_SEED_BASE + i, duration_s=8.0) for i in range(2)]
    src = NuScenesSource(write_nuscenes(scenes, tmp_path / "nuscenes"))
    calib = build_calibration_set(src, 6, cache_dir=tmp_path / "cache")
    assert len(calib) == 6 and all(s.sample_id.startswith("nuscenes/") for s in calib.samples)
    assert calib.manifest["failures"]["source_skipped"] == 8  # 4 keyframes per scene lack 2 s of history
    assert_even(calib.manifest)
    assert all(im.dtype == np.uint8 and im.ndim == 3 for s in calib.samples for im in s.images)
    assert build_calibration_set(src, 6, cache_dir=tmp_path / "cache").from_cache


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner.from_checkpoint(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> CalibrationSet:
    src = synthetic_calibration_source(2, duration_s=8.0)
    return build_calibration_set(src, 3, cache_dir=tmp_path_factory.mktemp("calib"))


def test_forward_loop_plans_every_observation_through_prefill_and_block_steps(
        planner: Planner, calib: CalibrationSet, monkeypatch: pytest.MonkeyPatch) -> None:
    model = planner.backend.model  # type: ignore[attr-defined]
    loop = make_forward_loop(planner, calib)
    calls: list[int] = []
    real_plan = planner.plan

    def counting_plan(obs: Observation) -> Plan:
        calls.append(1)
        return real_plan(obs)

    monkeypatch.setattr(planner, "plan", counting_plan)
    lengths: list[int] = []
    modes: list[AttentionMode] = []
    q_proj = dict(model.named_modules())["lm.layers.0.self_attn.q_proj"]
    hooks = [q_proj.register_forward_hook(lambda _m, args, _out: lengths.append(int(args[0].shape[1]))),
             model.lm.register_forward_pre_hook(lambda _m, _a, kw: modes.append(AttentionMode(kw["mode"])),
                                                with_kwargs=True)]
    try:
        loop(model)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(calib) == loop.stats.plans == 3 and loop.stats.calls == 1
    assert loop.stats.parse_failures == 0 and loop.stats.forwards == len(lengths)
    prompt_lengths = {len(planner.prompt(obs)[0]) for obs in calib.observations()}
    block = planner.settings.block_size
    assert block is not None and prompt_lengths <= set(lengths)
    assert any(n <= block for n in lengths)  # answer blocks as well as the prefill
    assert AttentionMode.BIDIRECTIONAL in modes and AttentionMode.CAUSAL in modes
    with pytest.raises(CalibrationError, match=r"planner\.backend\.model"):
        loop(torch.nn.Linear(2, 2))


def test_calibration_batches_teacher_force_the_planners_answer(planner: Planner, calib: CalibrationSet) -> None:
    model = planner.backend.model  # type: ignore[attr-defined]
    batches = calibration_batches(planner, calib)
    assert len(batches) == len(calib)
    batch = batches[0]
    p = batch["prompt_length"]
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and ids.shape[1] == p + len(planner.scaffold)
    assert (labels[0, :p] == -100).all() and torch.equal(labels[0, p:], ids[0, p:])
    assert batch["grid_thw"].shape == (1, 3) and batch["pixel_values"].ndim == 2
    weight = model.lm.layers[0].self_attn.q_proj.weight
    logits = forward_step(model, batch)  # ordinary tensors: a loss-based tool can take gradients
    (grad,) = torch.autograd.grad(answer_loss(logits, batch), weight)
    assert logits.shape[:2] == ids.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    logits = logits.detach()
    # the full causal forward predicts the greedy answer at every value slot the decoder chose
    logits[..., planner.config.tokens.mask] = float("-inf")
    predicted = logits[0, p - 1:-1].argmax(-1)
    slots = torch.from_numpy(~planner.scaffold.frozen)
    assert torch.equal(predicted[slots], ids[0, p:][slots])
