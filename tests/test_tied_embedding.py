"""One copy of a tied embedding in a bundle: the reference model ties its LM head to the token embedding, so the
export keeps the table once, as the head's initializer in ``lm_step.onnx`` (here with external data forced on, the
large-model path), and the graph backends look rows up there; an untied model keeps ``embed_tokens.npy``; a bundle
in the old layout (the table stored twice) still plans; a tampered or missing data file is still refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import torch_threads
from safetensors.numpy import load_file, save_file

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export.bundle_export import export_bundle
from blockpilot.export.external_data import THRESHOLD_ENV
from blockpilot.formats.bundle import BundleError, load_bundle
from blockpilot.formats.embedding_table import EmbeddingError, EmbeddingTable, locate_tied_embedding
from blockpilot.formats.onnx_spec import EMBED_FILE, load_spec
from blockpilot.formats.onnx_tensor import find_initializer
from blockpilot.runtime.bundle_planner import planner_from_bundle
from blockpilot.runtime.ort_backend import ort_planner
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError
from blockpilot.runtime.planner import Planner

GRAPHS = "graphs/decomposed"
SCAFFOLD = DecoderSettings(name="scaffold")


def _total(bundle: Path) -> int:
    return sum(int(f["bytes"]) for f in json.loads((bundle / "manifest.json").read_text())["files"].values())


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference model exported now (one copy) and as before this change (the head's table found nowhere, so
    ``embed_tokens.npy`` is written beside it), both with every weight in ``<graph>.onnx.data``."""
    root = tmp_path_factory.mktemp("tied")
    out = {}
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setenv(THRESHOLD_ENV, "4096")
        out["one"] = export_bundle(SHIPPED_MODEL, root / "one").bundle
        mp.setattr("blockpilot.export.onnx_graphs.locate_tied_embedding", lambda graph, weight: None)
        out["old"] = export_bundle(SHIPPED_MODEL, root / "old").bundle
    return out


@pytest.fixture(scope="module")
def torch_planner() -> Planner:
    with torch_threads(1):
        return Planner.from_checkpoint(SHIPPED_MODEL, decoder=SCAFFOLD)


def test_tied_bundle_keeps_one_table_and_records_where(bundles: dict[str, Path], torch_planner: Planner) -> None:
    one, old = bundles["one"], bundles["old"]
    manifest = json.loads((one / "manifest.json").read_text())
    assert f"{GRAPHS}/{EMBED_FILE}" not in manifest["files"] and not (one / GRAPHS / EMBED_FILE).exists()
    lm = next(g for g in manifest["graphs"] if g["role"] == "lm_step")
    where = lm["io"]["spec"]["embed"]  # the manifest records where the table lives
    assert where == load_spec(one / GRAPHS)["embed"] and where["graph"] == "lm_step.onnx"
    head = find_initializer(one / GRAPHS / "lm_step.onnx", where["tensor"])
    assert head.file.name == "lm_step.onnx.data" and head.dims == (128, 768)  # the head's (hidden, vocab) MatMul
    weight = torch_planner.backend.model.lm.embed_tokens.weight.detach().numpy()  # type: ignore[attr-defined]
    table = EmbeddingTable(load_spec(one / GRAPHS), one / GRAPHS)
    ids = np.array([0, 1, 767, 5, 5, 300])
    np.testing.assert_array_equal(table[ids], weight[ids])
    assert table[ids].dtype == np.float32 and table[ids].flags.c_contiguous
    # The old layout held the same table twice; the bundle shrinks by the table's bytes (the .npy's header aside).
    assert (old / GRAPHS / EMBED_FILE).is_file() and "embed" not in load_spec(old / GRAPHS)
    drop = _total(old) - _total(one)
    assert weight.nbytes <= drop <= weight.nbytes + 256


def test_one_copy_old_layout_and_torch_plan_alike(bundles: dict[str, Path], torch_planner: Planner) -> None:
    with torch_threads(1):
        one = planner_from_bundle(bundles["one"], decoder=SCAFFOLD)
        old = planner_from_bundle(bundles["old"], decoder=SCAFFOLD)
        for frame in heldout_keyframes(1, stride=12)[:2]:
            obs = observation(frame)
            want = torch_planner.plan(obs).tokens
            np.testing.assert_array_equal(one.plan(obs).tokens, want)
            np.testing.assert_array_equal(old.plan(obs).tokens, want)


def test_tampered_or_missing_head_data_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundles["one"], tmp_path / "tampered"))
    spec = load_spec(copy / GRAPHS)
    head = find_initializer(copy / GRAPHS / "lm_step.onnx", spec["embed"]["tensor"])
    with head.file.open("r+b") as fh:  # one embedding value changed in place
        fh.seek(head.offset + 4 * 1000)
        fh.write(b"\x00\x00\x80\x7f")
    with pytest.raises(BundleError, match=r"lm_step\.onnx\.data"):
        load_bundle(copy)
    with pytest.raises(PlannerSetupError, match=r"bundle refused: .*lm_step\.onnx\.data"):
        planner_from_bundle(copy)
    head.file.unlink()
    with pytest.raises(PlannerSetupError, match=r"lm_step\.onnx\.data"):
        planner_from_bundle(copy, verify=False)


def test_a_spec_naming_a_missing_tensor_is_refused_naming_it(bundles: dict[str, Path], tmp_path: Path) -> None:
    graphs = Path(shutil.copytree(bundles["one"] / GRAPHS, tmp_path / "graphs"))
    spec = load_spec(graphs)
    spec["embed"]["tensor"] = "no_such_head"
    (graphs / "onnx_spec.json").write_text(json.dumps(spec))
    with pytest.raises(PlannerSetupError, match=r"lm_step\.onnx: no initializer 'no_such_head'"):
        ort_planner(SHIPPED_MODEL, graphs, decoder=SCAFFOLD)
    spec["embed"] = {**load_spec(bundles["one"] / GRAPHS)["embed"], "layout": "rows"}  # (hidden, vocab) read as rows
    with pytest.raises(EmbeddingError, match=r"shape \[128, 768\], but .* need \[768, 128\] \(rows\)"):
        EmbeddingTable(spec, graphs)
    old_style = {**spec, "embed_file": EMBED_FILE}
    del old_style["embed"]
    with pytest.raises(EmbeddingError, match=r"embed_tokens\.npy: the export's token embedding table is missing"):
        EmbeddingTable(old_style, graphs)


def test_a_head_that_differs_from_the_embedding_is_not_taken_for_it(bundles: dict[str, Path]) -> None:
    graph = bundles["one"] / GRAPHS / "lm_step.onnx"
    table = EmbeddingTable(load_spec(graph.parent), graph.parent)[np.arange(768)]
    assert locate_tied_embedding(graph, table) == load_spec(graph.parent)["embed"]
    table[767, 3] += 1e-3  # a quantized or retrained head is not the embedding: the export keeps its own table
    assert locate_tied_embedding(graph, table) is None


def _untied_checkpoint(path: Path) -> np.ndarray[Any, Any]:
    """The reference checkpoint with its own LM head (the embedding, perturbed) and ``tie_word_embeddings`` off."""
    shutil.copytree(SHIPPED_MODEL, path)
    tensors = load_file(str(path / "model.safetensors"))
    embed = tensors["model.language_model.embed_tokens.weight"]
    rng = np.random.default_rng(0)
    tensors["lm_head.weight"] = (embed + rng.standard_normal(embed.shape).astype(embed.dtype) * 0.05).astype(
        embed.dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return np.asarray(embed, dtype=np.float32)


def test_untied_bundle_keeps_its_embedding_file(tmp_path: Path) -> None:
    embed = _untied_checkpoint(tmp_path / "untied")
    with torch_threads(1):
        torch_planner = Planner.from_checkpoint(tmp_path / "untied", decoder=SCAFFOLD)
        model = torch_planner.backend.model  # type: ignore[attr-defined]
        assert model.lm.lm_head.weight is not model.lm.embed_tokens.weight
        bundle = export_bundle(tmp_path / "untied", tmp_path / "bundle").bundle
        spec = load_spec(bundle / GRAPHS)
        assert spec["embed_file"] == EMBED_FILE and "embed" not in spec
        assert f"{GRAPHS}/{EMBED_FILE}" in json.loads((bundle / "manifest.json").read_text())["files"]
        np.testing.assert_array_equal(np.load(bundle / GRAPHS / EMBED_FILE), embed)
        ort = planner_from_bundle(bundle, decoder=SCAFFOLD)
        obs = observation(heldout_keyframes(1, stride=12)[0])
        np.testing.assert_array_equal(ort.plan(obs).tokens, torch_planner.plan(obs).tokens)
