"""One way to open a planner (:func:`blockpilot.runtime.sources.open_planner`): a checkpoint, a bundle or what
``blockpilot quantize`` wrote, found by looking; anything else is a typed error naming the path. The commands
built on it: ``plan`` and ``eval`` on a quantize output, ``export`` of one, ``eval --backend tensorrt`` on a bundle
where TensorRT cannot run (a one-line error, no traceback)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import torch_threads

from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL, road_image
from blockpilot.eval.records import read_results
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.formats.bundle import BundleError, load_bundle
from blockpilot.quant.apply import load_quantized
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError
from blockpilot.runtime.sources import PlannerSourceError, detect_source, open_planner

SCAFFOLD = DecoderSettings(name="scaffold")
EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bundle(shipped_bundle: Path) -> Path:
    return shipped_bundle  # tests/conftest.py


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """``blockpilot quantize --recipe fp8 --out DIR``'s DIR (files in DIR/quantized) and the planner it quantized."""
    from blockpilot.calibration import synthetic_calibration_source
    from blockpilot.quant.pipeline import quantize_checkpoint
    from blockpilot.quant.recipes import resolve_recipe

    out = tmp_path_factory.mktemp("open_quantized")
    outcome = quantize_checkpoint(SHIPPED_MODEL, resolve_recipe("fp8"), synthetic_calibration_source(1, duration_s=8.0),
                                  2, out, target="cpu", cache_dir=out / "cache")
    return out, outcome.planner


@pytest.fixture(scope="module")
def obs() -> Any:
    return observation(heldout_keyframes(1, stride=10)[0])


def test_detects_each_kind(bundle: Path, quantized: tuple[Path, Any]) -> None:
    out, _ = quantized
    assert detect_source(SHIPPED_MODEL).kind == "checkpoint"
    assert detect_source(bundle).kind == "bundle"
    for given in (out, out / "quantized"):  # the --out directory, or the files' own directory
        found = detect_source(given)
        assert (found.kind, found.quantized, found.checkpoint) == ("quantized", out / "quantized",
                                                                   Path(SHIPPED_MODEL).resolve())


def test_anything_else_is_a_typed_error_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for path, words in ((tmp_path, "not a checkpoint (config.json), a bundle (manifest.json) or a quantize output"),
                        (tmp_path / "missing", "does not exist"), (tmp_path / "notes.txt", "is a file")):
        with pytest.raises(PlannerSourceError, match=re.escape(words)) as caught:
            open_planner(path, decoder=SCAFFOLD)
        assert str(path) in str(caught.value)
    assert issubclass(PlannerSourceError, PlannerSetupError)


def test_a_quantize_output_whose_checkpoint_moved_names_its_record(tmp_path: Path,
                                                                   quantized: tuple[Path, Any]) -> None:
    copy = Path(shutil.copytree(quantized[0] / "quantized", tmp_path / "q"))
    record = json.loads((copy / "precision_map.json").read_text())
    (copy / "precision_map.json").write_text(json.dumps({**record, "checkpoint": str(tmp_path / "gone")}))
    with pytest.raises(PlannerSourceError, match=r"precision_map\.json: the checkpoint it was quantized from"):
        detect_source(copy)


def test_each_kind_opens_a_ready_planner(bundle: Path, quantized: tuple[Path, Any], obs: Any) -> None:
    from blockpilot.runtime.ort_backend import OrtBackend
    from blockpilot.runtime.torch_backend import TorchBackend

    checkpoint = open_planner(SHIPPED_MODEL, decoder=SCAFFOLD)
    from_bundle = open_planner(bundle, decoder=SCAFFOLD)
    assert isinstance(checkpoint.backend, TorchBackend) and isinstance(from_bundle.backend, OrtBackend)
    assert np.array_equal(checkpoint.plan(obs).tokens, from_bundle.plan(obs).tokens)
    out, quantizer = quantized
    restored = open_planner(out, decoder=SCAFFOLD, restore_quantized=load_quantized)
    # The quantizers came back: the restored planner answers as the one that quantized, token for token.
    assert np.array_equal(restored.plan(obs).tokens, quantizer.plan(obs).tokens)
    assert "quantizer" in " ".join(n for n, _ in restored.backend.model.named_modules())  # type: ignore[attr-defined]


@pytest.mark.parametrize(("which", "kwargs", "words"), [
    ("bundle", {"backend": "torch"}, "a bundle runs on onnxruntime or tensorrt, not torch"),
    ("checkpoint", {"backend": "onnxruntime"}, "a checkpoint runs on torch or cuda, not onnxruntime; export a bundle"),
    ("checkpoint", {"backend": "jax"}, "backend 'jax': choose auto or one of"),
    ("quantized", {}, "a quantize output; plan it with blockpilot plan or eval"),
    ("quantized", {"backend": "cuda", "restore_quantized": load_quantized}, "runs on torch, not cuda"),
    ("quantized", {"dtype": "bfloat16", "restore_quantized": load_quantized}, "plans in float32"),
    ("bundle", {"kinds": ("checkpoint", "quantized")}, "a bundle; this takes a checkpoint or a quantize output"),
    ("bundle", {"schema": object()}, "answers in the schema it was exported with"),
])
def test_refusals_name_the_source(bundle: Path, quantized: tuple[Path, Any], which: str, kwargs: dict[str, Any],
                                  words: str) -> None:
    path = {"bundle": bundle, "checkpoint": Path(SHIPPED_MODEL), "quantized": quantized[0]}[which]
    with pytest.raises(PlannerSetupError, match=words) as caught:
        open_planner(path, decoder=SCAFFOLD, **kwargs)
    assert "jax" in str(caught.value) or str(path) in str(caught.value)


def test_plan_command_on_a_quantize_output(quantized: tuple[Path, Any], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "front.png"
    Image.fromarray(road_image(112)).save(image)
    code = main(["plan", "--checkpoint", str(quantized[0]), "--image", str(image), "--ego", EGO])
    out = json.loads(capsys.readouterr().out)
    assert code == (0 if out["parse_error"] is None else 3) and out["stats"]["decoder"] == "scaffold"


@pytest.fixture(scope="module")
def nuscenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.sim.generator import generate_scene
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    return write_nuscenes([generate_scene(1_000_123, duration_s=8.0)], tmp_path_factory.mktemp("nus") / "dataroot")


def test_eval_command_on_a_quantize_output(quantized: tuple[Path, Any], nuscenes_root: Path, tmp_path: Path) -> None:
    code = main(["eval", "--source", "nuscenes", "--dataroot", str(nuscenes_root), "--checkpoint", str(quantized[0]),
                 "--out", str(tmp_path / "run"), "--limit", "5", "--no-progress"])
    header, records = read_results(tmp_path / "run" / "results.jsonl")
    assert code == 0 and header is not None and len(records) == 5 and header["backend"] == "torch"
    assert header["quantized"] == str((quantized[0] / "quantized").resolve())


def test_eval_tensorrt_on_a_bundle_that_cannot_run_it_is_one_line(bundle: Path, nuscenes_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The bundle has no engines: without a GPU (here) or on one, the answer is one line naming what is missing.
    code = main(["eval", "--source", "nuscenes", "--dataroot", str(nuscenes_root), "--bundle", str(bundle),
                 "--backend", "tensorrt", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("blockpilot eval: error:") and "tensorrt" in err.lower()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_export_takes_a_quantize_output(quantized: tuple[Path, Any], tmp_path: Path) -> None:
    from blockpilot.export.bundle_export import export_bundle

    summary = export_bundle(quantized[0], tmp_path / "fp8")
    loaded = load_bundle(summary.bundle)
    saved = json.loads((quantized[0] / "quantized" / "precision_map.json").read_text())
    assert loaded.recipe is not None and loaded.recipe["name"] == "fp8"
    assert loaded.precision_map == saved["precision"] and summary.recipe == "fp8"
    with pytest.raises(BundleError, match="quantized with recipe 'fp8'; --recipe nvfp4 would quantize again"):
        export_bundle(quantized[0], tmp_path / "other", recipe="nvfp4")
    assert not (tmp_path / "other").exists()
