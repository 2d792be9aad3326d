"""Export in the checkpoint's stored dtype: a bf16 checkpoint is traced in bf16 (no float32 copy of the model) and its
graphs widened to float32 exactly, giving the graphs and answers of the float32 path; a float32 checkpoint takes the
float32 path unchanged (no rewrite)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from runtime_fixtures import torch_threads
from safetensors.torch import load_file, save_file
from test_export_bundle import REFERENCE
from test_export_native_attention import _feeds

from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export import fp32_graph
from blockpilot.export.bundle_export import export_bundle, export_dtype
from blockpilot.export.embedding_rows import Float32Rows
from blockpilot.export.external_data import THRESHOLD_ENV
from blockpilot.export.fp32_graph import Float32GraphError, to_float32_graph
from blockpilot.formats.bundle import describe_bundle, load_bundle
from blockpilot.formats.onnx_external import external_files
from blockpilot.runtime.bundle_planner import planner_from_bundle
from blockpilot.runtime.plan_types import DecoderSettings
from blockpilot.vla.checkpoint import stored_dtype

GRAPHS = "graphs/decomposed"


def _bf16_copy(dst: Path) -> Path:
    shutil.copytree(REFERENCE, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


class ExportSpy:
    """Records the parameter dtypes of every module ``torch.onnx.export`` traces, and every widening rewrite."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.traced: list[set[torch.dtype]] = []
        self.rewrites: list[str] = []
        real_export, real_rewrite = torch.onnx.export, fp32_graph.to_float32_graph

        def export(module: Any, *args: Any, **kwargs: Any) -> Any:
            self.traced.append({p.dtype for p in module.parameters()})
            return real_export(module, *args, **kwargs)

        def rewrite(path: Any, *args: Any, **kwargs: Any) -> Any:
            self.rewrites.append(Path(path).name)
            return real_rewrite(path, *args, **kwargs)

        mp.setattr(torch.onnx, "export", export)
        mp.setattr(fp32_graph, "to_float32_graph", rewrite)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bf16 reference checkpoint exported through the new path (external data forced) and the float32 path."""
    root = tmp_path_factory.mktemp("dtype")
    ckpt = _bf16_copy(root / "ckpt_bf16")
    out: dict[str, Any] = {"ckpt": ckpt}
    for dtype in ("auto", "float32"):
        with pytest.MonkeyPatch.context() as mp, torch_threads(1):
            mp.setenv(THRESHOLD_ENV, "4096")
            spy = ExportSpy(mp)
            out[dtype] = export_bundle(ckpt, root / f"bundle_{dtype}", dtype=dtype).bundle
            out[f"{dtype}_spy"] = spy
    return out


def _inits(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_stored_dtype_comes_from_the_headers(exports: dict[str, Any], tmp_path: Path) -> None:
    assert stored_dtype(exports["ckpt"]) == "bfloat16" == export_dtype(exports["ckpt"])
    assert stored_dtype(REFERENCE) == "float32" == export_dtype(exports["ckpt"], "float32")
    assert export_dtype(exports["ckpt"], float32_only=True) == "float32"  # fp8 recipe: calibration runs fp32
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.float16)},
              str(mixed / "model.safetensors"))
    assert stored_dtype(mixed) == "float32"  # bf16 + fp16: the widest that holds both


def test_the_traced_model_stays_bf16(exports: dict[str, Any]) -> None:
    spy = exports["auto_spy"]
    assert spy.traced and all(dtypes == {torch.bfloat16} for dtypes in spy.traced)  # LM step and vision
    assert sorted(spy.rewrites) == ["lm_step.onnx", "vision.onnx"]
    assert all(dtypes == {torch.float32} for dtypes in exports["float32_spy"].traced)
    assert exports["float32_spy"].rewrites == []


def test_initializers_are_the_checkpoint_bf16_values_exactly(exports: dict[str, Any]) -> None:
    new, old = exports["auto"] / GRAPHS, exports["float32"] / GRAPHS
    for graph in ("lm_step.onnx", "vision.onnx"):
        assert external_files(new / graph) == [f"{graph}.data"]
        a, b = _inits(new / graph), _inits(old / graph)
        assert all(v.dtype != np.float16 and v.dtype.name != "bfloat16" for v in a.values())
        # Same weights in both graphs (the float32 trace folds some of vision's Gemm weights transposed, under
        # anonymous names): compared as multisets of values, which a transpose keeps.
        assert sorted(np.sort(v, axis=None).tobytes() for v in a.values()) == \
            sorted(np.sort(v, axis=None).tobytes() for v in b.values())
    lm = _inits(new / "lm_step.onnx")
    found = {v.tobytes() for v in lm.values()} | {v.T.copy().tobytes() for v in lm.values()}
    for name, tensor in load_file(str(exports["ckpt"] / "model.safetensors")).items():
        if name.startswith("model.layers.") and tensor.dim() == 2:
            assert tensor.float().numpy().tobytes() in found, name  # bf16 widened: exact
    onnx_lm = onnx.load(str(new / "lm_step.onnx"), load_external_data=False)
    for vi in [*onnx_lm.graph.input, *onnx_lm.graph.output]:
        assert vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                 onnx.TensorProto.BOOL), vi.name


def test_lm_graph_is_the_float32_graph_node_for_node(exports: dict[str, Any]) -> None:
    a = onnx.load(str(exports["auto"] / GRAPHS / "lm_step.onnx"), load_external_data=False)
    b = onnx.load(str(exports["float32"] / GRAPHS / "lm_step.onnx"), load_external_data=False)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    consts = [[numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"]
              for m in (a, b)]
    # The attention scale is 1/sqrt(head_dim) exactly, not its bf16 rounding.
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(*consts, strict=True))


def test_new_path_answers_like_the_float32_path(exports: dict[str, Any]) -> None:
    import onnxruntime as ort

    spec = json.loads((exports["auto"] / GRAPHS / "onnx_spec.json").read_text())
    sessions = [ort.InferenceSession(str(exports[d] / GRAPHS / "lm_step.onnx"), providers=["CPUExecutionProvider"])
                for d in ("auto", "float32")]
    for mode, start, seed in ((0, 0, 1), (1, 40, 2), (2, 64, 3)):
        feeds = _feeds(spec, mode, start, 16, seed=seed, zero_cache=start == 0)
        (top_a, prob_a, *_), (top_b, prob_b, *_) = (s.run(None, feeds) for s in sessions)
        np.testing.assert_array_equal(top_a, top_b)
        np.testing.assert_allclose(prob_a, prob_b, rtol=0, atol=1e-5)
    vision = spec["vision"]["inputs"][0]["shape"]
    patches = np.random.default_rng(0).standard_normal(vision).astype(np.float32)
    feats = [ort.InferenceSession(str(exports[d] / GRAPHS / "vision.onnx"), providers=["CPUExecutionProvider"])
             .run(None, {"patches": patches})[0] for d in ("auto", "float32")]
    np.testing.assert_allclose(feats[0], feats[1], rtol=0, atol=1e-5)


def test_external_data_bundle_of_the_new_path_verifies_and_plans(exports: dict[str, Any]) -> None:
    bundle = load_bundle(exports["auto"])  # every file hashed, every external reference checked
    assert f"{GRAPHS}/lm_step.onnx.data" in bundle.files
    assert "lm_step.onnx.data" in describe_bundle(exports["auto"])
    spec = json.loads((exports["auto"] / GRAPHS / "onnx_spec.json").read_text())
    assert spec["lm_step"]["inputs"][0]["dtype"] == "float32" and "embed" in spec  # tied: one table, in the graph
    with torch_threads(1):
        obs = observation(heldout_keyframes(1, stride=12)[0])
        plans = [planner_from_bundle(exports[d], decoder=DecoderSettings(name="scaffold")).plan(obs).tokens
                 for d in ("auto", "float32")]
    np.testing.assert_array_equal(plans[0], plans[1])


def test_engine_rewrites_still_apply_to_the_widened_graph(exports: dict[str, Any], tmp_path: Path) -> None:
    from blockpilot.export.fp16_graph import to_fp16_graph
    from blockpilot.export.native_attention import to_native_attention

    lm = exports["auto"] / GRAPHS / "lm_step.onnx"
    layers = json.loads((exports["ckpt"] / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert to_native_attention(lm, tmp_path / "native.onnx")["attention_nodes"] == layers
    assert to_fp16_graph(lm, tmp_path / "half.onnx")["initializers"] > 0


def test_float32_checkpoint_takes_the_float32_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.export.onnx_graphs import export_onnx
    from blockpilot.vla.loader import load_model

    spy = ExportSpy(monkeypatch)
    with torch_threads(1):
        export_onnx(load_model(REFERENCE), tmp_path, capacity=128)
    assert spy.traced and all(d == {torch.float32} for d in spy.traced) and spy.rewrites == []


def test_embedding_rows_write_the_npy_np_save_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import blockpilot.export.embedding_rows as rows_module

    weight = torch.randn(37, 6).to(torch.bfloat16)
    monkeypatch.setattr(rows_module, "CHUNK_BYTES", 5 * 6 * 4)  # several blocks
    rows = Float32Rows(weight)
    rows.save_npy(tmp_path / "a.npy")
    np.save(tmp_path / "b.npy", weight.float().numpy())
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    np.testing.assert_array_equal(rows[3:9], weight[3:9].float().numpy())


def test_rewrite_restores_only_unambiguous_scalars_and_refuses_control_flow(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    scale = 1 / np.sqrt(128)
    bf = helper.make_tensor("c", TensorProto.BFLOAT16, [], [float(scale)])  # rounded by make_tensor
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=bf), helper.make_node("Mul", ["x", "c"], ["y"]),
         helper.make_node("Cast", ["y"], ["z"], to=TensorProto.BFLOAT16)], "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [2])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    counts = to_float32_graph(path, tmp_path / "wide.onnx", exact_scalars=[scale])
    assert counts["scalars_restored"] == 1 and counts["casts_retargeted"] == 1 and counts["io_retyped"] == 2
    wide = onnx.load(str(tmp_path / "wide.onnx"))
    assert numpy_helper.to_array(wide.graph.node[0].attribute[0].t) == np.float32(scale)
    # Two scalars with the same bf16 rounding: which one it was cannot be told, the rounded value stays.
    counts = to_float32_graph(path, tmp_path / "amb.onnx", exact_scalars=[scale, float(scale) * (1 + 1e-4)])
    assert counts["scalars_restored"] == 0
    loop = helper.make_graph([helper.make_node("If", ["b"], ["o"], then_branch=graph, else_branch=graph)], "l",
                             [helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(loop), str(tmp_path / "if.onnx"))
    with pytest.raises(Float32GraphError, match=r"if\.onnx.*control-flow"):
        to_float32_graph(tmp_path / "if.onnx")


def test_rewrite_of_torch_per_tensor_files_widens_external_constants_too(tmp_path: Path) -> None:
    """A graph over 2 GB comes from torch with one file per tensor, Constant values included: all of it ends in
    ``<graph>.onnx.data``, widened, and the per-tensor files are removed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx.external_data_helper import convert_model_to_external_data

    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((64, 32)).astype(np.float32)).to(torch.bfloat16)
    c = torch.from_numpy(rng.standard_normal((1, 32)).astype(np.float32)).to(torch.bfloat16)

    def bf16(name: str, t: torch.Tensor) -> Any:
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes(),
                                  raw=True)

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("Constant", [], ["c"], value=bf16("c_value", c)),
         helper.make_node("MatMul", ["xb", "w"], ["h"]), helper.make_node("Add", ["h", "c"], ["hc"]),
         helper.make_node("Cast", ["hc"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], initializer=[bf16("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    assert len(external_files(path)) == 2
    counts = to_float32_graph(path, threshold=1 << 30)
    assert counts["initializers"] == 1 and counts["constants"] == 1
    assert external_files(path) == ["g.onnx.data"] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["g.onnx", "g.onnx.data"]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w.float().numpy() + c.float().numpy(), rtol=1e-5, atol=1e-5)


def test_fp16_checkpoint_is_traced_in_fp16_and_answers_like_the_float32_path(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from blockpilot.export.onnx_graphs import export_onnx
    from blockpilot.vla.loader import load_model

    ckpt = tmp_path / "ckpt_fp16"
    shutil.copytree(REFERENCE, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(ckpt / "model.safetensors"))
    assert stored_dtype(ckpt) == "float16"
    spy = ExportSpy(monkeypatch)
    with torch_threads(1):
        spec = export_onnx(load_model(ckpt, dtype="float16"), tmp_path / "auto", capacity=128)
        export_onnx(load_model(ckpt, dtype="float16"), tmp_path / "f32", capacity=128, dtype="float32")
    assert spy.traced[0] == {torch.float16} and spy.traced[-1] == {torch.float32}
    feeds = _feeds(spec, 1, 20, 12, seed=4, zero_cache=False)
    (top_a, prob_a, *_), (top_b, prob_b, *_) = (
        ort.InferenceSession(str(tmp_path / d / "lm_step.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        for d in ("auto", "f32"))
    np.testing.assert_array_equal(top_a, top_b)
    np.testing.assert_allclose(prob_a, prob_b, rtol=0, atol=1e-5)
