"""ONNX export of the shipped model and the ONNX Runtime backend against the torch backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export import export_onnx
from blockpilot.runtime.backend import Prompt, PromptError, Sampling
from blockpilot.runtime.ort_backend import OrtBackend, OrtUnsupportedError, ort_planner
from blockpilot.runtime.plan_types import DecoderSettings, Observation, PlannerSetupError
from blockpilot.runtime.planner import Planner
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.reference_model import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.is_dir(), reason="the shipped reference model is missing")

CAPACITY = 512


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from blockpilot.vla.loader import load_model

    out = tmp_path_factory.mktemp("onnx")
    spec = export_onnx(load_model(SHIPPED_MODEL), out, CAPACITY)
    return out, spec


@pytest.fixture(scope="module")
def observations() -> list[Observation]:
    return [observation(k) for k in heldout_keyframes(2)[:3]]


@pytest.fixture(scope="module")
def torch_planner() -> Planner:
    return Planner.from_checkpoint(SHIPPED_MODEL, decoder=DecoderSettings(name="scaffold"),
                                   max_prompt_tokens=CAPACITY - 200)


def _ort(exported: tuple[Path, dict[str, Any]], name: str) -> Planner:
    return ort_planner(SHIPPED_MODEL, exported[0], decoder=DecoderSettings(name=name))


def test_graphs_pass_the_checker_and_spec_names_their_io(exported: tuple[Path, dict[str, Any]]) -> None:
    out, spec = exported
    for name in ("vision.onnx", "lm_step.onnx"):
        onnx.checker.check_model(str(out / name))
    assert (out / "onnx_spec.json").is_file()
    # The reference model ties its head to the embedding: the table stays once, in the head's initializer.
    assert not (out / "embed_tokens.npy").exists() and "embed_file" not in spec
    assert spec["embed"]["graph"] == "lm_step.onnx" and spec["embed"]["layout"] == "columns"
    lm = onnx.load(str(out / "lm_step.onnx"))
    assert [i.name for i in lm.graph.input] == [i["name"] for i in spec["lm_step"]["inputs"]]
    assert [o.name for o in lm.graph.output] == [o["name"] for o in spec["lm_step"]["outputs"]]
    ops = {n.op_type for n in lm.graph.node}
    assert {"MatMul", "Softmax", "ArgMax"} <= ops
    assert spec["capacity"] == CAPACITY and spec["vision"]["grid_thw"] == [1, 8, 8]


def test_the_torch_model_reads_the_one_host_side_image_path(observations: list[Observation]) -> None:
    """The graph backends' prompt_images and the torch model's inputs (image_inputs, rope_index) are one numpy
    implementation: same patches, same grid, same M-RoPE positions and delta."""
    import torch

    from blockpilot.vla.image import prompt_images, vision_policy
    from blockpilot.vla.loader import load_model
    from blockpilot.vla.vision import image_inputs

    model = load_model(SHIPPED_MODEL)
    image_id = model.config.tokens.image
    assert image_id is not None
    image = observations[0].images[0]
    patches, grid = image_inputs([image], _vision_config())
    ids = np.array([1, 5] + [image_id] * (int(grid[0, 1] * grid[0, 2]) // 4) + [6, 9, 3], dtype=np.int64)
    host = prompt_images(ids, [image], vision_policy(_vision_config()), image_id)
    np.testing.assert_array_equal(host.patches[0], patches.numpy())
    assert host.grid_thw.tolist() == grid.tolist()
    positions, delta = model.rope_index(torch.from_numpy(ids)[None], grid)
    np.testing.assert_array_equal(host.positions, positions.numpy())
    assert host.rope_delta == int(delta[0]) < 0


def _vision_config() -> Any:
    from blockpilot.vla.hf_config import load_config

    return load_config(SHIPPED_MODEL).vision


def test_prefill_and_block_steps_match_torch(exported: tuple[Path, dict[str, Any]], torch_planner: Planner,
                                             observations: list[Observation]) -> None:
    prompt, _ = torch_planner.prompt(observations[0])
    from blockpilot.vla.loader import load_model

    tb = TorchBackend(load_model(SHIPPED_MODEL), CAPACITY)
    ob = OrtBackend(exported[0])
    a, b = tb.prefill(prompt), ob.prefill(prompt)
    np.testing.assert_array_equal(a.top1, b.top1)
    np.testing.assert_allclose(a.prob, b.prob, atol=1e-4)
    assert ob.length == tb.length == len(prompt) and "vision" in b.stage_ms
    template = torch_planner.scaffold.token_ids[None, :32]
    n = len(prompt)
    for mode, write in [(AttentionMode.BIDIRECTIONAL, False), (AttentionMode.BLOCK, False),
                        (AttentionMode.CAUSAL, True), (AttentionMode.BIDIRECTIONAL, False)]:
        a = tb.step(template, n, mode=mode, write_kv=write)
        b = ob.step(template, n, mode=mode, write_kv=write)
        np.testing.assert_array_equal(a.top1, b.top1)
        np.testing.assert_allclose(a.prob, b.prob, atol=1e-4)
        assert ob.length == tb.length
    # A draft after a commit sees the committed block; truncate only moves the length.
    tb.truncate(n + 8)
    ob.truncate(n + 8)
    a = tb.step(template[:, 8:16], n + 8, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    b = ob.step(template[:, 8:16], n + 8, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    np.testing.assert_array_equal(a.top1, b.top1)
    np.testing.assert_allclose(a.prob, b.prob, atol=1e-4)
    assert ob.length == n + 8
    # Sub-block cache: re-run the first 8 slots seeing the whole previously written block (kv_end).
    for backend in (tb, ob):
        backend.step(template, n, mode=AttentionMode.CAUSAL, write_kv=True)
    a = tb.step(template[:, :8], n, mode=AttentionMode.BIDIRECTIONAL, write_kv=True, kv_end=n + 32)
    b = ob.step(template[:, :8], n, mode=AttentionMode.BIDIRECTIONAL, write_kv=True, kv_end=n + 32)
    np.testing.assert_array_equal(a.top1, b.top1)
    np.testing.assert_allclose(a.prob, b.prob, atol=1e-4)
    assert ob.length == tb.length == n + 32


def test_scaffold_plans_match_torch_and_ar(exported: tuple[Path, dict[str, Any]], torch_planner: Planner,
                                           observations: list[Observation]) -> None:
    scaffold, ar = _ort(exported, "scaffold"), _ort(exported, "ar")
    assert len(observations) == 3
    for obs in observations:
        ref = torch_planner.plan(obs)
        got = scaffold.plan(obs)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        assert got.stats.forwards == ref.stats.forwards
        assert got.error is None and got.plan is not None
        np.testing.assert_array_equal(ar.plan(obs).tokens, got.tokens)


def test_sampling_fork_and_bad_images_raise_clearly(exported: tuple[Path, dict[str, Any]],
                                                    torch_planner: Planner, observations: list[Observation]) -> None:
    ob = OrtBackend(exported[0])
    prompt, _ = torch_planner.prompt(observations[0])
    ob.prefill(prompt)
    tokens = torch_planner.scaffold.token_ids[None, :4]
    with pytest.raises(OrtUnsupportedError, match="rollouts need the torch backend"):
        ob.step(tokens, len(prompt), mode=AttentionMode.CAUSAL, write_kv=True, sampling=Sampling(1.0, (1,)))
    assert ob.length == len(prompt)
    with pytest.raises(OrtUnsupportedError, match="rollouts need the torch backend"):
        ob.fork(2)
    ob.fork(1)
    with pytest.raises(PlannerSetupError, match="rollouts need the torch backend"):
        _ort(exported, "rollouts")
    # Any other frame size is resized to the exported one (the export's image policy), never refused.
    big = np.zeros((224, 224, 3), dtype=np.uint8)
    ob.prefill(Prompt(prompt.token_ids, (big,)))
    assert ob.length == len(prompt)
    with pytest.raises(PromptError, match="holds 16 image tokens but its 2 image"):
        ob.prefill(Prompt(prompt.token_ids, (big, big)))
    with pytest.raises(PromptError, match="no images"):
        ob.prefill(Prompt(prompt.token_ids))


def test_ort_planner_runs_without_importing_torch(exported: tuple[Path, dict[str, Any]]) -> None:
    from runtime_fixtures import assert_plans_without_torch

    assert_plans_without_torch("from blockpilot.runtime.ort_backend import ort_planner",
                               f"ort_planner({str(SHIPPED_MODEL)!r}, {str(exported[0])!r}, "
                               "decoder=DecoderSettings(name='scaffold'))", timeout=120)
