"""Checkpoint -> bundle -> planner on ONNX Runtime: the export command, the bundle as the car loads it,
replay evaluation of a bundle, and refusal of a tampered one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtime_fixtures import assert_bundle_plans_like_torch, torch_threads

from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export.bundle_export import export_bundle
from blockpilot.runtime.bundle_planner import planner_from_bundle
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch_threads(1):
        return export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("b") / "bundle").bundle


def test_bundle_lists_graphs_and_model_files(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = set(manifest["files"])
    assert {"model/config.json", "model/tokenizer.json", "model/blockpilot.json", "graphs/decomposed/lm_step.onnx",
            "graphs/decomposed/vision.onnx"} <= listed
    assert "graphs/decomposed/embed_tokens.npy" not in listed  # tied: the lm_step graph's head holds the table
    assert not any(p.endswith(".safetensors") for p in listed)  # graphs carry the weights; --with-weights adds them
    assert manifest["precision_map"] == {}


def test_bundle_planner_answers_like_the_torch_planner(bundle: Path) -> None:
    assert_bundle_plans_like_torch(bundle, SHIPPED_MODEL)


def test_tampered_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    graph = copy / "graphs" / "decomposed" / "lm_step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(PlannerSetupError, match=r"lm_step\.onnx.*modified"):
        planner_from_bundle(copy)


def test_export_inspect_and_eval_commands(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockpilot.sim.generator import generate_scene
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    assert main(["export", "--checkpoint", str(SHIPPED_MODEL), "--out", str(bundle)]) == 2  # exists: refused
    assert "exists" in capsys.readouterr().err
    assert main(["inspect", str(bundle)]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    root = write_nuscenes([generate_scene(1_000_321, duration_s=6.0)], tmp_path / "nus")
    args = ["eval", "--source", "nuscenes", "--dataroot", str(root), "--limit", "6", "--no-progress"]
    assert main([*args, "--bundle", str(bundle), "--out", str(tmp_path / "run")]) == 0
    header = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])["header"]
    assert header["backend"] == "onnxruntime"
    assert main([*args, "--bundle", str(bundle), "--checkpoint", str(SHIPPED_MODEL), "--out", str(tmp_path / "x")]) == 2


def test_export_builds_tensorrt_rtx_engines_into_the_bundle(tmp_path: Path) -> None:
    from blockpilot.formats.bundle import load_bundle

    with torch_threads(1):
        summary = export_bundle(SHIPPED_MODEL, tmp_path / "b", targets=("rtx",), engine_precision="fp16",
                                attention="decomposed")
    bundle = load_bundle(summary.bundle)
    engines = {(a.role, a.target, a.sm, a.precision, a.variant) for a in bundle.engines()}
    assert engines == {("vision", "rtx", "8.9", "fp16", "decomposed"), ("lm_step", "rtx", "8.9", "fp16", "decomposed")}
    assert all(summary.files[a.path] > 100_000 for a in bundle.engines())
    assert "tensorrt_rtx" in bundle.tools
    # The closing table names every graph and engine with its size and build time.
    table = summary.table()
    for a in bundle.artifacts:
        assert a.path in table
    assert table.count(" s\n") >= 2 and "stages     load" in table
    with torch_threads(1):  # "rtx-ada" is an alias of "rtx"; auto attention is the target's: native
        native = load_bundle(export_bundle(SHIPPED_MODEL, tmp_path / "n", targets=("rtx-ada",)).bundle)
    assert {(a.role, a.variant, a.precision, a.target) for a in native.engines()} == {
        ("lm_step", "native", "fp16", "rtx"), ("vision", "decomposed", "fp16", "rtx")}
    assert {a.variant for a in native.graphs()} == {"decomposed"}  # ONNX Runtime keeps the decomposed graphs
    # Beside each engine: the parsed network's layers and precisions (the engine inspector needs a GPU).
    lm = next(a for a in native.engines() if a.role == "lm_step")
    network = json.loads(native.file(lm.extra_files[0]).read_text())
    assert lm.extra_files[0].endswith(".network.json") and lm.io["build"]["network"] == Path(lm.extra_files[0]).name
    assert network["attention_layers"] == lm.io["build"]["attention_layers"] > 0 and network["plugin_layers"] == 0
    assert network["output_precisions"].get("HALF", 0) > 0 and "/tmp" not in json.dumps(lm.io)
    # fp16 engines keep the KV cache in fp16 (decomposed and native alike), recorded in the manifest.
    half = dict.fromkeys(("past_k", "past_v", "k_new", "v_new"), "HALF")
    for engine in (lm, next(a for a in bundle.engines() if a.role == "lm_step")):
        assert engine.io["kv_cache"] == {"dtype": "float16", "tensors": half}
    assert {t["name"]: t["dtype"] for t in network["inputs"]}["inputs_embeds"] == "FLOAT"
    assert all("kv_cache" not in a.io for a in bundle.engines() if a.role == "vision")
    from blockpilot.formats.bundle import describe_bundle

    assert "(lm_step, native, fp16, target rtx sm 8.9, KV cache float16)" in describe_bundle(native.path)


def test_export_refuses_targets_this_machine_cannot_build(tmp_path: Path) -> None:
    from blockpilot.export.targets import EngineTargetError
    from blockpilot.quant.targets import PrecisionNotSupportedError

    with pytest.raises(EngineTargetError, match="TensorRT proper"):  # Orin engines are built on the Orin
        export_bundle(SHIPPED_MODEL, tmp_path / "c", targets=("orin",))
    with pytest.raises(PrecisionNotSupportedError, match="orin"):  # the gate speaks before any work is done
        export_bundle(SHIPPED_MODEL, tmp_path / "c", targets=("orin",), recipe="fp8")
    with pytest.raises(EngineTargetError, match="no plugin layers"):
        export_bundle(SHIPPED_MODEL, tmp_path / "c", targets=("rtx",), attention="plugin")
    with pytest.raises(EngineTargetError, match=r"unknown engine target 'jetson'.*rtx, rtx-blackwell, orin"):
        export_bundle(SHIPPED_MODEL, tmp_path / "c", targets=("jetson",))
    assert not (tmp_path / "c").exists()


def test_verify_compares_the_bundle_with_torch(bundle: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with torch_threads(1):
        assert main(["verify", str(bundle), "--checkpoint", str(SHIPPED_MODEL), "--samples", "2",
                     "--json-out", str(tmp_path / "v.json")]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["identical_plans"] == 2 and report["max_prefill_prob_diff"] < 1e-4
    assert "2/2 identical answers" in capsys.readouterr().out
    assert main(["verify", str(bundle)]) == 2  # exported without weights: nothing to compare against
    assert "--with-weights" in capsys.readouterr().err


def test_fp8_bundle_runs_on_onnx_runtime(tmp_path: Path) -> None:
    from blockpilot.formats.bundle import load_bundle

    with torch_threads(1):
        summary = export_bundle(SHIPPED_MODEL, tmp_path / "fp8", recipe="fp8", calib=4, targets=("rtx",))
        bundle = load_bundle(summary.bundle)
        assert bundle.recipe is not None and bundle.recipe["name"] == "fp8"
        # FP8 engines: the LM step through TensorRT's attention layer (ONNX Attention, opset 23).
        assert {(a.role, a.variant, a.precision) for a in bundle.engines()} == {
            ("lm_step", "native", "fp8"), ("vision", "decomposed", "fp8")}
        assert {a.precision for a in bundle.graphs()} == {"fp8"}
        assert {r.get("weight") for r in bundle.precision_map.values()} == {"fp8_e4m3"}
        planner = planner_from_bundle(summary.bundle, decoder=DecoderSettings(name="scaffold"))
        plan = planner.plan(observation(heldout_keyframes(1, stride=12)[1]))
    assert plan.ok, plan.error
    with pytest.raises(Exception, match="NVFP4"):
        export_bundle(SHIPPED_MODEL, tmp_path / "nv", recipe="nvfp4")
