"""Bundle writer and loader: a round trip from the shipped reference model, then every way a bundle
can be damaged on its way to the car, each refused with a message naming the file or versions."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from blockpilot.formats.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    BundleError,
    BundleVersionError,
    BundleWriter,
    describe_bundle,
    load_bundle,
)

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"
IO_SPEC: dict[str, Any] = {"inputs": {"input_ids": ["batch", 32]}, "outputs": {"top1": ["batch", 32]}}
PRECISION: dict[str, Any] = {"lm.layers.0.mlp.up_proj": {"input": "fp8", "weight": "fp8"}}
RECIPE: dict[str, Any] = {"name": "fp8-mlp", "rules": [], "algorithm": "max", "kv_cache": None, "description": "",
                          "auto": None}


def external_graph(location: str = "lm_step.onnx.data", length: int = 2048, offset: int = 0) -> bytes:
    """A real (tiny) ONNX model whose one initializer lives in the external file ``location``."""
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    weight = helper.make_tensor("w", TensorProto.FLOAT, [length // 4], vals=b"\0" * length, raw=True)
    set_external_data(weight, location, offset=offset, length=length)
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [length // 4])], [weight])
    return bytes(helper.make_model(graph).SerializeToString())


def _fakes(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {"graph": external_graph(), "data": bytes(range(256)) * 8, "engine": b"ENGINE" * 300,
             "inspector": json.dumps({"layers": ["attn", "mlp"]}).encode()}
    names = {"graph": "lm_step.onnx", "data": "lm_step.onnx.data", "engine": "lm_step.engine",
             "inspector": "lm_step.layers.json"}
    out = {key: root / names[key] for key in files}
    for key, data in files.items():
        out[key].write_bytes(data)
    return out


def build(out: Path, scratch: Path, *, overwrite: bool = False, precision: dict[str, Any] | None = None) -> Path:
    """A bundle whose tool record does not depend on what this machine has installed (TensorRT-RTX or not):
    detection is pinned to torch only, and the engine says it was built with TensorRT 10.3 on the car."""
    fakes = _fakes(scratch)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("blockpilot.formats.bundle.tool_versions", lambda: {"torch": "2.13.0+cpu"})
        return _write(out, fakes, overwrite, precision)


def _write(out: Path, fakes: dict[str, Path], overwrite: bool, precision: dict[str, Any] | None) -> Path:
    with BundleWriter(out, overwrite=overwrite, tools={"tensorrt": "10.3.0.30"}) as writer:
        writer.add_model(REFERENCE)
        writer.add_graph(fakes["graph"], role="lm_step", variant="decomposed", precision="fp8", io=IO_SPEC,
                         extra_files=[fakes["data"]])
        writer.add_engine(fakes["engine"], target="orin", sm=87, role="lm_step", variant="plugin",
                          precision="fp16", io=IO_SPEC, inspector=fakes["inspector"])
        writer.precision_map = PRECISION if precision is None else precision
        writer.recipe = RECIPE
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    return build(root / "bundle", root / "scratch")


@pytest.fixture
def fresh(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine bundle to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def test_round_trip_lists_and_hashes_every_file(pristine: Path) -> None:
    bundle = load_bundle(pristine)
    on_disk = {p.relative_to(pristine).as_posix() for p in pristine.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(bundle.files) == on_disk
    assert {"model/config.json", "model/tokenizer.json", "model/blockpilot.json", "model/model.safetensors",
            "model/preprocessor_config.json", "graphs/decomposed/lm_step.onnx", "graphs/decomposed/lm_step.onnx.data",
            "engines/orin/lm_step.engine", "engines/orin/lm_step.layers.json"} == on_disk
    for rel, info in bundle.files.items():
        data = (pristine / rel).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert bundle.model_config == json.loads((REFERENCE / "config.json").read_text())
    assert bundle.schema == json.loads((REFERENCE / "blockpilot.json").read_text())["schema"]
    assert bundle.precision_map == PRECISION and bundle.recipe == RECIPE
    assert bundle.manifest["format_version"] == FORMAT_VERSION
    assert datetime.fromisoformat(bundle.manifest["created_at"]).utcoffset() == timedelta(0)
    assert bundle.tools["tensorrt"] == "10.3.0.30" and "torch" in bundle.tools  # torch: read from metadata


def test_accessors(pristine: Path) -> None:
    bundle = load_bundle(pristine)
    (graph,) = bundle.graphs()
    assert bundle.graphs("decomposed") == [graph] and bundle.graphs("plugin") == []
    assert (graph.path, graph.role, graph.precision, graph.io) == ("graphs/decomposed/lm_step.onnx", "lm_step",
                                                                   "fp8", IO_SPEC)
    assert graph.extra_files == ("graphs/decomposed/lm_step.onnx.data",)
    (engine,) = bundle.engines("orin")
    assert bundle.engines() == [engine] and bundle.engines("thor") == []
    assert (engine.target, engine.sm, engine.variant, engine.tools) == ("orin", "87", "plugin",
                                                                        {"tensorrt": "10.3.0.30"})
    assert engine.extra_files == ("engines/orin/lm_step.layers.json",)
    assert bundle.file(engine.path).read_bytes() == b"ENGINE" * 300
    with pytest.raises(BundleError, match=r"nothing\.bin: not a file of this bundle"):
        bundle.file("engines/orin/nothing.bin")


def test_describe(pristine: Path) -> None:
    text = describe_bundle(pristine)
    for part in ("Qwen2_5_VLForConditionalGeneration", "schema driving", "input fp8 x1", "weight fp8 x1",
                 "fp8-mlp", "tensorrt 10.3.0.30", "target orin sm 87", "model/model.safetensors", "sha256 verified"):
        assert part in text, part


def _plant_deep(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERS: dict[str, tuple[Callable[[Path], object], str]] = {
    "modified": (lambda b: _flip_byte(b / "model/model.safetensors"), r"model\.safetensors: modified \(sha256"),
    "truncated": (lambda b: (b / "engines/orin/lm_step.engine").write_bytes(b"ENGINE"),
                  r"lm_step\.engine: truncated \(6 bytes"),
    "grown": (lambda b: (b / "model/config.json").write_text((b / "model/config.json").read_text() + " "),
              r"config\.json: modified"),
    "missing": (lambda b: (b / "model/tokenizer.json").unlink(), r"tokenizer\.json: missing"),
    "planted": (lambda b: (b / "graphs/decomposed/evil.onnx").write_bytes(b"x"),
                r"evil\.onnx: not listed in manifest\.json"),
    "planted_dir": (lambda b: _plant_deep(b / "quant/deep/x.pth"), r"x\.pth: not listed"),
    "manifest_garbage": (lambda b: (b / MANIFEST).write_text('{"format": '), r"manifest\.json: not readable JSON"),
    "manifest_missing": (lambda b: (b / MANIFEST).unlink(), r"manifest\.json: missing"),
    "manifest_not_object": (lambda b: (b / MANIFEST).write_text("[]"), r"manifest\.json: expected a JSON object"),
}


def _edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_tampered_bundle_is_refused(fresh: Path, case: str) -> None:
    damage, message = TAMPERS[case]
    damage(fresh)
    with pytest.raises(BundleError, match=message):
        load_bundle(fresh)


def test_same_size_change_needs_verify(fresh: Path) -> None:
    _flip_byte(fresh / "model/model.safetensors")
    load_bundle(fresh, verify=False)  # sizes still match: only hashing finds it
    (fresh / "model/model.safetensors").write_bytes(b"")
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(fresh, verify=False)


def test_wrong_format_version(fresh: Path) -> None:
    _edit_manifest(fresh, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleVersionError, match=rf"manifest\.json: bundle format version {FORMAT_VERSION + 1}"):
        load_bundle(fresh)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["files"].update({"../outside": {"sha256": "0", "bytes": 0}}), r"'\.\./outside' is not a valid"),
    (lambda m: m["files"].pop("graphs/decomposed/lm_step.onnx"), r"lm_step\.onnx' is not listed in 'files'"),
    (lambda m: m.pop("schema"), r"'schema' is missing"),
    (lambda m: m["engines"][0].pop("target"), r"malformed engine entry"),
])
def test_malformed_manifest(fresh: Path, edit: Callable[[dict[str, Any]], object], message: str) -> None:
    _edit_manifest(fresh, edit)
    with pytest.raises(BundleError, match=rf"manifest\.json: .*{message}"):
        load_bundle(fresh)


def test_tool_versions(pristine: Path) -> None:
    load_bundle(pristine, require_tools={"tensorrt": "10.7.0"})  # same major
    with pytest.raises(BundleVersionError, match=r"lm_step\.engine: built with tensorrt 10\.3\.0\.30, but this "
                                                 r"runtime has tensorrt 11\.0\.1"):
        load_bundle(pristine, require_tools={"tensorrt": "11.0.1"})
    with pytest.raises(BundleVersionError, match=r"records no tensorrt_rtx version; this runtime has tensorrt_rtx 1\."):
        load_bundle(pristine, require_tools={"tensorrt_rtx": "1.2"})


def test_engine_record_wins_over_builder_tools(tmp_path: Path) -> None:
    engine = tmp_path / "a.engine"
    engine.write_bytes(b"e")
    with BundleWriter(tmp_path / "b", tools={"tensorrt": "11.0"}) as writer:
        writer.add_model(REFERENCE, weights=False)
        writer.add_engine(engine, target="orin", sm="87", role="lm_step", variant="plugin", precision="fp16",
                          tools={"tensorrt": "10.3"})  # built on the car, assembled on a workstation
    assert "model/model.safetensors" not in load_bundle(tmp_path / "b").files
    load_bundle(tmp_path / "b", require_tools={"tensorrt": "10.3"})
    with pytest.raises(BundleVersionError, match=r"a\.engine: built with tensorrt 10\.3"):
        load_bundle(tmp_path / "b", require_tools={"tensorrt": "11.0"})


def test_interrupted_export_leaves_no_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="export crashed"), BundleWriter(out) as writer:
        writer.add_model(REFERENCE)
        raise RuntimeError("export crashed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    abandoned = BundleWriter(out)  # a killed process: no cleanup runs at all
    abandoned.add_model(REFERENCE)
    assert not (out / MANIFEST).exists()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(out)
    assert not list(abandoned.staging.glob(MANIFEST))


def test_finish_needs_config_and_closes(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path / "b")
    with pytest.raises(BundleError, match="no config and schema"):
        writer.finish()
    writer.add_model(REFERENCE, weights=False)
    assert writer.finish() == tmp_path / "b"
    with pytest.raises(BundleError, match="writer already finished"):  # not a missing-schema message
        writer.finish()
    with pytest.raises(BundleError, match="already finished"):
        writer.add_file(REFERENCE / "config.json", "model", "again.json")


def test_overwrite(pristine: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        build(out, tmp_path / "scratch")
    (out / "graphs/decomposed/stale.onnx").write_bytes(b"old")  # gone after a rebuild
    build(out, tmp_path / "scratch", overwrite=True, precision={})
    bundle = load_bundle(out)
    assert bundle.precision_map == {} and "graphs/decomposed/stale.onnx" not in bundle.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "scratch"]  # no staging or old copy left
    assert "full precision" in describe_bundle(out, verify=False)


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not a bundle"):
        BundleWriter(tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_add_quant_and_add_dir(tmp_path: Path) -> None:
    quant = tmp_path / "quantized"
    quant.mkdir()
    (quant / "precision_map.json").write_text(json.dumps({"precision": PRECISION, "recipe": RECIPE}))
    (quant / "modelopt_state.pth").write_bytes(b"state")
    (quant / "quantized_weights.pth").write_bytes(b"weights")
    (tmp_path / "extra" / "sub").mkdir(parents=True)
    (tmp_path / "extra" / "sub" / "notes.json").write_text("{}")
    with BundleWriter(tmp_path / "b") as writer:
        writer.add_model(REFERENCE, weights=False)
        assert writer.add_quant(quant) == ["quant/precision_map.json", "quant/modelopt_state.pth",
                                           "quant/quantized_weights.pth"]
        assert writer.add_dir(tmp_path / "extra", "model", "docs") == ["model/docs/sub/notes.json"]
        with pytest.raises(BundleError, match="not a valid file path"):
            writer.add_file(quant / "modelopt_state.pth", "quant", "../escape.pth")
    bundle = load_bundle(tmp_path / "b")
    assert bundle.precision_map == PRECISION and bundle.recipe == RECIPE


def test_import_is_torch_free() -> None:
    code = "import sys, blockpilot.formats.bundle; print(sorted({'torch', 'onnx', 'tensorrt'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
