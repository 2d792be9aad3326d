"""Polygraphy comparisons of ``blockpilot verify``, on the CPU: real LM-step feeds recorded from plans of the
shipped model's bundle, the decomposed graph against its native-attention (ONNX ``Attention``, opset 23) and
fp16 rewrites with two ONNX Runtime runners, and the verify command's TensorRT route where no GPU is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import torch_threads

from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export.bundle_export import export_bundle
from blockpilot.export.fp16_graph import to_fp16_graph
from blockpilot.export.native_attention import to_native_attention
from blockpilot.export.verify_trt import TOLERANCES, compare_graphs, lm_feeds, vision_feeds
from blockpilot.formats.embedding_table import EmbeddingTable
from blockpilot.formats.onnx_spec import load_spec


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch_threads(1):
        return export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("pg") / "bundle").bundle


@pytest.fixture(scope="module")
def observations() -> list[Any]:
    return [observation(f) for f in heldout_keyframes(2, stride=12)[::3][:2]]


@pytest.fixture(scope="module")
def feeds(bundle: Path, observations: list[Any]) -> list[dict[str, np.ndarray]]:
    return lm_feeds(bundle, observations, steps=2)


def _graph(bundle: Path, name: str) -> Path:
    return bundle / "graphs" / "decomposed" / name


def test_feeds_are_real_prefills_and_block_steps_with_their_cache(bundle: Path, feeds: list[dict[str, np.ndarray]],
                                                                  observations: list[Any]) -> None:
    spec = load_spec(_graph(bundle, "lm_step.onnx").parent)
    assert len(feeds) == 3 * len(observations)
    embed = EmbeddingTable(spec, _graph(bundle, "lm_step.onnx").parent)[np.arange(spec["vocab_size"])]
    assert not feeds[0]["past_k"].any()  # the first plan starts on an empty cache; later ones on stale, masked slots
    for first, (prefill, *steps) in enumerate(feeds[i:i + 3] for i in range(0, len(feeds), 3)):
        n = prefill["inputs_embeds"].shape[1]
        assert int(prefill["start"]) == 0 and int(prefill["key_end"]) == n > 100  # a whole prompt, images included
        image_rows = ~np.isclose(prefill["inputs_embeds"][0][:, None], embed[None]).all(-1).any(-1)
        assert image_rows.sum() == 16 * len(observations[0].images)  # vision features over the image tokens
        for step in steps:
            t = step["inputs_embeds"].shape[1]
            assert int(step["start"]) == n and t == spec["block_size"] and int(step["key_end"]) >= n + t
            assert step["past_k"][:, :, :, :n].any()  # the prompt's KV, as the prefill wrote it
            assert first or not step["past_k"][:, :, :, n:].any()
        assert {int(s["mode"]) for s in steps} <= set(spec["mode_ids"].values())


def test_engine_feeds_spell_out_or_drop_the_typed_slot_inputs(bundle: Path,
                                                              feeds: list[dict[str, np.ndarray]]) -> None:
    """An engine with the typed-slot inputs gets them on every feed (the ONNX defaults written out, which give
    the graph's own outputs); an engine built before them gets none."""
    import onnxruntime as ort

    from blockpilot.export.verify_trt import engine_lm_feeds

    vocab = load_spec(_graph(bundle, "lm_step.onnx").parent)["vocab_size"]
    explicit = engine_lm_feeds(feeds, True, vocab)
    assert all({"allowed_table", "token_class"} <= set(f) for f in explicit)
    assert explicit[0]["token_class"].shape == (1, feeds[0]["inputs_embeds"].shape[1])
    assert not any({"allowed_table", "token_class"} & set(f) for f in engine_lm_feeds(feeds, False, vocab))
    session = ort.InferenceSession(str(_graph(bundle, "lm_step.onnx")), providers=["CPUExecutionProvider"])
    bare = {k: v for k, v in feeds[0].items() if k not in ("allowed_table", "token_class")}
    for a, b in zip(session.run(["top1", "prob"], bare), session.run(["top1", "prob"], explicit[0]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_native_attention_graph_agrees_with_the_decomposed_one(bundle: Path, feeds: list[dict[str, np.ndarray]],
                                                               tmp_path: Path) -> None:
    native = tmp_path / "lm_native.onnx"
    to_native_attention(_graph(bundle, "lm_step.onnx"), native)
    result = compare_graphs(_graph(bundle, "lm_step.onnx"), native, feeds)
    assert result.passed, result.text()
    assert result.top1_agreement == 1.0 and result.top1_positions == sum(f["inputs_embeds"].shape[1] for f in feeds)
    assert {o.name for o in result.outputs} == {"prob", "k_new", "v_new"}
    assert all(o.max_abs <= 1e-4 and o.atol == TOLERANCES["fp32"][0][o.name] for o in result.outputs)


def test_fp16_rewrite_differences_are_reported_not_hidden(bundle: Path, feeds: list[dict[str, np.ndarray]],
                                                          observations: list[Any], tmp_path: Path) -> None:
    half = tmp_path / "lm16.onnx"
    to_fp16_graph(_graph(bundle, "lm_step.onnx"), half)
    atol, min_top1 = TOLERANCES["fp16"]
    result = compare_graphs(_graph(bundle, "lm_step.onnx"), half, feeds, atol=atol, min_top1_agreement=min_top1)
    print(result.text())
    assert result.passed, result.text()
    assert result.top1_agreement is not None and result.top1_agreement >= min_top1
    diffs = {o.name: o for o in result.outputs}
    assert 1e-4 < diffs["prob"].max_abs < atol["prob"]  # fp16 does move the probabilities, within tolerance
    assert 1e-4 < diffs["k_new"].max_abs < atol["k_new"]
    strict = compare_graphs(_graph(bundle, "lm_step.onnx"), half, feeds, atol={"prob": 1e-6}, min_top1_agreement=1.0)
    assert not strict.passed and "EXCEEDS" in strict.text() and "atol" in strict.text()
    assert json.loads(json.dumps(strict.to_dict()))["outputs"][0]["atol"] == 1e-6
    vision16 = tmp_path / "vision16.onnx"
    to_fp16_graph(_graph(bundle, "vision.onnx"), vision16)
    spec = load_spec(_graph(bundle, "lm_step.onnx").parent)
    images = vision_feeds(spec, observations)
    vision = compare_graphs(_graph(bundle, "vision.onnx"), vision16, images, role="vision", atol=atol)
    assert vision.top1_agreement is None and [o.name for o in vision.outputs] == ["features"]
    assert vision.feeds == len(images) > 0 and vision.passed, vision.text()


def test_verify_command_routes_by_backend(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockpilot.export.verify_trt import tensorrt_unavailable
    from blockpilot.formats.bundle import load_bundle

    why = tensorrt_unavailable(load_bundle(bundle))
    assert why == "the bundle holds no engines"
    assert main(["verify", str(bundle), "--backend", "tensorrt"]) == 2
    assert "verify --backend tensorrt: the bundle holds no engines" in capsys.readouterr().err
    assert main(["verify", str(bundle), "--backend", "onnxruntime"]) == 2  # no weights: the torch side needs them
    assert "--with-weights" in capsys.readouterr().err
