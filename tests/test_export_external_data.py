"""The large-model paths on the shipped reference model: external data forced on by a few-KB threshold
(``BLOCKPILOT_EXTERNAL_DATA_BYTES``), so a graph's weights live in ``<graph>.onnx.data``, travel in the bundle, are
hashed in the manifest and checked on load; a bundle missing one is refused by the writer, ``inspect`` and the
loader with an error naming the graph and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import assert_bundle_plans_like_torch, torch_threads
from test_export_bundle import REFERENCE, external_graph

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.export.bundle_export import export_bundle
from blockpilot.export.external_data import THRESHOLD_ENV, consolidate, external_threshold
from blockpilot.formats.bundle import BundleError, BundleWriter, describe_bundle, load_bundle
from blockpilot.formats.onnx_external import ExternalDataError, check_external_data, external_files
from blockpilot.runtime.bundle_planner import planner_from_bundle
from blockpilot.runtime.plan_types import PlannerSetupError

GRAPHS = "graphs/decomposed"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setenv(THRESHOLD_ENV, "4096")
        return export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("ext") / "bundle").bundle


def test_every_graph_keeps_its_weights_in_one_data_file_of_the_bundle(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    graphs = {g["path"]: g for g in manifest["graphs"]}
    for rel in (f"{GRAPHS}/lm_step.onnx", f"{GRAPHS}/vision.onnx"):
        assert external_files(bundle / rel) == [f"{Path(rel).name}.data"]
        data = f"{rel}.data"
        assert data in manifest["files"] and data in graphs[rel]["extra_files"]
        assert manifest["files"][data]["bytes"] > 5 * (bundle / rel).stat().st_size  # the weights moved out
    assert not [p for p in (bundle / GRAPHS).iterdir() if p.name.startswith(("lm.", "visual.", "onnx::"))]


def test_external_data_bundle_answers_like_the_torch_planner(bundle: Path) -> None:
    assert_bundle_plans_like_torch(bundle, SHIPPED_MODEL)


def _drop_from_manifest(bundle: Path, rel: str) -> None:
    """The 1.5B bug: the graph names a data file that the bundle neither holds nor lists."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"][rel]
    for graph in manifest["graphs"]:
        graph["extra_files"] = [f for f in graph["extra_files"] if f != rel]
    path.write_text(json.dumps(manifest))
    (bundle / rel).unlink()


def test_bundle_without_a_referenced_data_file_is_refused_everywhere(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    _drop_from_manifest(copy, f"{GRAPHS}/lm_step.onnx.data")
    pattern = r"lm_step\.onnx: its external data file 'lm_step\.onnx\.data' is not part of the bundle"
    with pytest.raises(BundleError, match=pattern):
        load_bundle(copy)
    with pytest.raises(BundleError, match=pattern):
        describe_bundle(copy)  # blockpilot inspect
    with pytest.raises(PlannerSetupError, match=pattern):
        planner_from_bundle(copy)


def test_truncated_data_file_is_refused_without_hashing(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    data = copy / GRAPHS / "vision.onnx.data"
    size = data.stat().st_size
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][f"{GRAPHS}/vision.onnx.data"]["bytes"] = size - 4096
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with data.open("r+b") as fh:
        fh.truncate(size - 4096)
    with pytest.raises(BundleError, match=r"vision\.onnx: tensor .* needs bytes up to \d+ of .*vision\.onnx\.data"):
        load_bundle(copy, verify=False)


def test_writer_copies_referenced_data_and_refuses_a_missing_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "lm_step.onnx").write_bytes(external_graph("weights/lm.bin", length=1024, offset=4096))
    with BundleWriter(tmp_path / "refused") as writer:
        writer.add_model(REFERENCE, weights=False)
        with pytest.raises(BundleError, match=r"src/lm_step\.onnx: external data file .*weights/lm\.bin is missing"):
            writer.add_graph(src / "lm_step.onnx", role="lm_step", variant="decomposed", precision="fp32")
        writer.abort()
    (src / "weights").mkdir()
    (src / "weights" / "lm.bin").write_bytes(b"\1" * 4096)
    with pytest.raises(BundleError, match=r"tensor 'w' needs bytes up to 5120 of .*lm\.bin, which holds 4096"):
        BundleWriter(tmp_path / "short").add_graph(src / "lm_step.onnx", role="lm_step", variant="d", precision="x")
    (src / "weights" / "lm.bin").write_bytes(b"\1" * 5120)
    with BundleWriter(tmp_path / "ok") as writer:
        writer.add_model(REFERENCE, weights=False)
        art = writer.add_graph(src / "lm_step.onnx", role="lm_step", variant="decomposed", precision="fp32")
    assert art.extra_files == ("graphs/decomposed/weights/lm.bin",)
    assert "graphs/decomposed/weights/lm.bin" in load_bundle(tmp_path / "ok").files


def test_external_paths_outside_the_graph_directory_are_refused(tmp_path: Path) -> None:
    (tmp_path / "g.onnx").write_bytes(external_graph("../secret.bin"))
    with pytest.raises(ExternalDataError, match=r"'\.\./secret\.bin' outside the graph's directory"):
        check_external_data(tmp_path / "g.onnx")


def test_consolidate_moves_weights_into_one_aligned_file_and_keeps_values(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((64, 48)).astype(np.float32), np.float32([2.0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("Mul", ["h", "small"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert consolidate(path, threshold=1 << 20) is None  # under the threshold: self-contained
    assert external_files(path) == []
    assert consolidate(path, threshold=1024) == "g.onnx.data"
    assert external_files(path) == ["g.onnx.data"]
    stored = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert stored["small"].data_location == TensorProto.DEFAULT  # tiny tensors stay inline
    assert int({e.key: e.value for e in stored["big"].external_data}["offset"]) % 4096 == 0
    x = rng.standard_normal((1, 64)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ big * 2, rtol=1e-5, atol=1e-5)


def test_threshold_env_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THRESHOLD_ENV, "4096")
    assert external_threshold() == 4096
    monkeypatch.setenv(THRESHOLD_ENV, "4 KB")
    with pytest.raises(ExternalDataError, match=THRESHOLD_ENV):
        external_threshold()


@pytest.fixture(scope="module")
def external_graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The reference model's graphs with every weight in ``<graph>.onnx.data``."""
    from blockpilot.export.onnx_graphs import export_onnx
    from blockpilot.vla.loader import load_model

    out = tmp_path_factory.mktemp("ext_graphs")
    with pytest.MonkeyPatch.context() as mp, torch_threads(1):
        mp.setenv(THRESHOLD_ENV, "4096")
        spec = export_onnx(load_model(REFERENCE), out, capacity=256)
    assert external_files(out / "lm_step.onnx") == ["lm_step.onnx.data"]
    return out, spec


def _run(path: Path, feeds: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds))


def test_native_attention_rewrite_keeps_weights_external(external_graphs: tuple[Path, dict[str, Any]],
                                                         tmp_path: Path) -> None:
    from test_export_native_attention import _feeds

    from blockpilot.export.native_attention import NATIVE_OPSET, to_native_attention

    out, spec = external_graphs
    native = tmp_path / "elsewhere" / "lm_native.onnx"  # another directory: the data file is linked beside it
    report = to_native_attention(out / "lm_step.onnx", native)
    assert report["opset"] == NATIVE_OPSET and report["attention_nodes"] == spec_layers(spec, out)
    assert external_files(native) == ["lm_step.onnx.data"]
    assert native.stat().st_size < (out / "lm_step.onnx.data").stat().st_size / 10
    feeds = _feeds(spec, 1, 40, 16, seed=3, zero_cache=False)
    ref, got = _run(out / "lm_step.onnx", feeds), _run(native, feeds)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-4)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5)


def spec_layers(spec: dict[str, Any], out: Path) -> int:
    return int(json.loads((out / "onnx_spec.json").read_text())["lm_step"]["inputs"][5]["shape"][0])


def test_fp16_rewrite_streams_weights_into_its_own_data_file(external_graphs: tuple[Path, dict[str, Any]],
                                                             tmp_path: Path) -> None:
    from test_export_native_attention import _feeds

    from blockpilot.export.fp16_graph import to_fp16_graph

    out, spec = external_graphs
    half = tmp_path / "lm16.onnx"
    counts = to_fp16_graph(out / "lm_step.onnx", half)
    assert counts["initializers"] > 0
    assert external_files(half) == ["lm16.onnx.data"]
    full = (out / "lm_step.onnx.data").stat().st_size
    assert 0.4 * full < (tmp_path / "lm16.onnx.data").stat().st_size < 0.6 * full  # the weights, halved
    feeds = _feeds(spec, 1, 0, 16, seed=5, zero_cache=True)
    (top_a, prob_a, k_a, _), (top_b, prob_b, k_b, _) = _run(out / "lm_step.onnx", feeds), _run(half, feeds)
    assert (top_a == top_b).mean() >= 0.9
    assert np.abs(prob_a - prob_b).max() < 0.05 and np.abs(k_a - k_b).max() < 0.05


def test_fp16_cache_io_rewrites_keep_external_weights(external_graphs: tuple[Path, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    """Both cache-I/O rewrites on a graph with external data: the fp16 rewrite with fp16 cache I/O streams its own
    data file, the boundary-only one (fp8 engines) shares the source's; both run with a float16 cache."""
    from test_export_native_attention import _feeds

    from blockpilot.export.cache_io import fp16_cache_io
    from blockpilot.export.fp16_graph import KV_CACHE_IO, to_fp16_graph

    out, spec = external_graphs
    half, boundary = tmp_path / "half" / "lm16.onnx", tmp_path / "boundary" / "lm.onnx"
    half.parent.mkdir()
    assert to_fp16_graph(out / "lm_step.onnx", half, fp16_io=KV_CACHE_IO)["fp16_io"] == 4
    assert fp16_cache_io(out / "lm_step.onnx", boundary) == {"inputs": 2, "outputs": 2}
    assert external_files(half) == ["lm16.onnx.data"] and external_files(boundary) == ["lm_step.onnx.data"]
    feeds = _feeds(spec, 1, 0, 16, seed=5, zero_cache=True)
    top_a, prob_a, k_a, _ = _run(out / "lm_step.onnx", feeds)
    feeds16 = {k: v.astype(np.float16) if k in ("past_k", "past_v") else v for k, v in feeds.items()}
    for graph in (half, boundary):
        top_b, prob_b, k_b, _ = _run(graph, feeds16)
        assert k_b.dtype == np.float16 and (top_a == top_b).mean() >= 0.9
        assert np.abs(prob_a - prob_b).max() < 0.05 and np.abs(k_a - k_b.astype(np.float32)).max() < 0.05


def test_fp16_rewrite_reads_constants_stored_as_external_data(tmp_path: Path) -> None:
    """A graph over 2 GB has big Constant values in external files too (torch writes them so, and the float32
    widening keeps them there): the fp16 rewrite reads them from the graph's directory and writes them into its own
    data file (a 1.5B engine build failed here before)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from blockpilot.export.fp16_graph import to_fp16_graph

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    idx = np.arange(16, dtype=np.int64).reshape(16)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value")),
             helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(np.tile(idx, 64), "idx_value")),
             helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Gather", ["y", "idx"], ["z"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1024])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "src" / "lm_step.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="lm_step.onnx.data", size_threshold=0, convert_attribute=True)
    assert sum(a.t.data_location == TensorProto.EXTERNAL for n in onnx.load(str(src), load_external_data=False)
               .graph.node for a in n.attribute) == 2
    dst = tmp_path / "out" / "lm_step.fp16.onnx"
    dst.parent.mkdir()
    counts = to_fp16_graph(src, dst)
    assert counts["constants"] == 1
    shutil.rmtree(src.parent)  # the output must not need the source's data file
    x = rng.standard_normal((1, 64)).astype(np.float32)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, (x @ w)[:, np.tile(idx, 64)], atol=2e-2)
