"""The whole pipeline for an action-chunk (robot) model: quantize calibrated on robot frames of a LeRobot dataset,
the action-L1 quality gate, export, ONNX Runtime planning a robot observation, and ``verify`` on robot samples.

The model is the random-init reference model declared as answering in the so101-ee schema (as
tests/test_robot_planner.py builds it); the dataset is two short episodes written with LeRobot's own writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import torch_threads

from blockpilot.cli import main
from blockpilot.vla.plans import SO101_EE_DIMS, SO101_JOINTS, ActionChunkSchema

pytestmark = pytest.mark.usefixtures("one_thread")


def _episode(seed: int, steps: int = 6) -> Any:
    from blockpilot.sim.robot.types import RobotEpisode

    rng = np.random.default_rng(seed)
    images = {"front": rng.integers(0, 255, (steps, 48, 64, 3), dtype=np.uint8)}
    actions = np.column_stack([rng.uniform(-1, 1, (steps, 3)), (np.arange(steps) >= steps // 2)]).astype(np.float32)
    return RobotEpisode(seed=seed, task="SO101PickPlace-v0", instruction="Pick up the cube.", fps=10, images=images,
                        joint_names=SO101_JOINTS, joint_state=rng.uniform(-1, 1, (steps, 6)).astype(np.float32),
                        ee_pose=np.tile(np.float32([0.2, 0, 0.1, 1, 0, 0, 0]), (steps, 1)),
                        environment_state=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                        action_names=SO101_EE_DIMS, actions=actions, success=np.zeros(steps, bool))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockpilot.sim.robot.lerobot_io import write_lerobot_dataset
    from blockpilot.vla.reference_model import write_reference_checkpoint
    from blockpilot.vla.schema_io import save_schema

    root = tmp_path_factory.mktemp("robot_pipeline")
    ckpt = write_reference_checkpoint(root / "ckpt")
    save_schema(ckpt, ActionChunkSchema.so101_ee())
    dataset = write_lerobot_dataset([_episode(1), _episode(2)], root / "dataset")
    return {"root": root, "ckpt": ckpt, "dataset": dataset}


@pytest.fixture(scope="module")
def quantized(files: dict[str, Path]) -> dict[str, Any]:
    out = files["root"] / "quant"
    argv = ["quantize", "--checkpoint", str(files["ckpt"]), "--recipe", "fp8", "--calib", "4",
            "--calib-source", "lerobot", "--calib-dataroot", str(files["dataset"]), "--out", str(out),
            "--gate", "--gate-source", "lerobot", "--gate-dataroot", str(files["dataset"]), "--gate-limit", "1",
            "--gate-action-l1", "10"]
    with torch_threads(1):
        rc = main(argv)
    return {"rc": rc, "out": out}


def test_quantize_calibrates_on_robot_frames_and_gates_on_action_l1(quantized: dict[str, Any],
                                                                   files: dict[str, Path]) -> None:
    assert quantized["rc"] == 0
    info = json.loads((quantized["out"] / "quantized" / "precision_map.json").read_text())
    calib = info["calibration"]
    assert calib["source"]["name"] == "lerobot" and calib["selected"] == 4 and calib["content_hash"]
    assert calib["strata"] == {"episode 0": {"selected": 2}, "episode 1": {"selected": 2}}  # evenly spaced
    assert calib["loop"]["answer_sources"] == {"truth": 4, "greedy": 0}  # the recorded chunks, teacher-forced
    assert info["schema"]["kind"] == "action_chunk" and info["schema"]["dims"] == list(SO101_EE_DIMS)
    assert {r.get("weight") for r in info["precision"].values()} == {"fp8_e4m3"}
    gate = json.loads((quantized["out"] / "gate" / "gate.json").read_text())
    assert gate["metric"] == "action_l1_vs_fp32" and gate["passed"] and gate["l2_3s_fp32"] is None
    assert gate["samples"] <= 1 and 0 <= gate["action_l1_vs_fp32"] <= gate["action_max_abs_diff_vs_fp32"]
    assert set(gate["action_l1_vs_target"]) == {"fp32", "quantized"}
    assert (quantized["out"] / "gate" / "fp8" / "report" / "metrics.json").is_file()


def test_gate_fails_when_the_chunks_move_past_the_bound() -> None:
    from blockpilot.quant.gate import decide_robot

    def record(i: int, pred: list[list[float]] | None, status: str = "ok") -> dict[str, Any]:
        return {"index": i, "status": status, "pred": pred, "target": [[0.0, 0.0]] * 2, "pad": [False, True]}

    fp32 = [record(0, [[0.1, 0.2], [9.0, 9.0]]), record(1, [[0.0, 0.0], [0.0, 0.0]])]
    close = [record(0, [[0.1, 0.25], [0.0, 0.0]]), record(1, [[0.0, 0.0], [0.0, 0.0]])]
    result = decide_robot(fp32, close, l1_bound=0.05)
    assert result.passed and result.samples == 2
    assert result.action_l1_vs_fp32 == pytest.approx(0.0125) and result.action_max_abs_diff_vs_fp32 == \
        pytest.approx(0.05)  # the padded second row is not scored
    far = [record(0, [[0.5, 0.2], [0.0, 0.0]]), record(1, None, "parse_error")]
    result = decide_robot(fp32, far, l1_bound=0.05)
    assert not result.passed and result.samples == 1
    assert any("over the 0.05 bound" in r for r in result.reasons) and any("parse rate" in r for r in result.reasons)


@pytest.fixture(scope="module")
def fp8_bundle(quantized: dict[str, Any], files: dict[str, Path]) -> Path:
    """The fp8 bundle exported from the quantize output (its restored quantizers, no recalibration)."""
    from blockpilot.export.bundle_export import export_bundle

    with torch_threads(1):
        return export_bundle(quantized["out"], files["root"] / "fp8-bundle").bundle


def test_quantize_output_plans_in_its_recorded_schema_and_exports_to_an_fp8_bundle(
        quantized: dict[str, Any], files: dict[str, Path], fp8_bundle: Path) -> None:
    from blockpilot.calibration.robot import LeRobotCalibrationSource
    from blockpilot.quant.pipeline import load_planner
    from blockpilot.runtime.plan_types import DecoderSettings
    from blockpilot.runtime.sources import open_planner

    obs = LeRobotCalibrationSource(files["dataset"], ActionChunkSchema.so101_ee()).sample(3).observation()
    with torch_threads(1):
        assert load_planner(quantized["out"], DecoderSettings(name="scaffold")).schema == ActionChunkSchema.so101_ee()
        ort = open_planner(fp8_bundle, backend="onnxruntime", decoder=DecoderSettings(name="scaffold"))
        plan = ort.plan_robot(obs)
    assert ort.schema == ActionChunkSchema.so101_ee() and plan.stats.image_tokens > 0
    assert plan.ok and plan.actions is not None and plan.actions.shape == (8, 4)


def test_verify_compares_a_robot_bundle_on_robot_samples(files: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from blockpilot.export.bundle_export import export_bundle

    with torch_threads(1):
        bundle = export_bundle(files["ckpt"], tmp_path / "bundle", with_weights=True).bundle
        rc = main(["verify", str(bundle), "--samples", "1", "--dataroot", str(files["dataset"]), "--json-out",
                   str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "v.json").read_text())
    assert rc == 0 and report["passed"] and report["identical_plans"] == report["samples"] == 1, out
    assert report["action_l1"] == 0.0 and report["action_max_abs_diff"] == 0.0
    assert "LeRobot dataset" in report["samples_from"] and "actions  L1" in out
    assert main(["verify", str(bundle)]) == 2  # a robot bundle without robot samples: refused, naming the flag
    assert "--dataroot" in capsys.readouterr().err


def test_verify_takes_the_quantize_output_an_fp8_bundle_came_from_as_its_reference(
        quantized: dict[str, Any], files: dict[str, Path], fp8_bundle: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    def verify(reference: Path, name: str) -> tuple[int, dict[str, Any], str]:
        with torch_threads(1):
            rc = main(["verify", str(fp8_bundle), "--checkpoint", str(reference), "--samples", "4", "--dataroot",
                       str(files["dataset"]), "--json-out", str(tmp_path / name)])
        return rc, json.loads((tmp_path / name).read_text()), capsys.readouterr().out

    _, restored, text = verify(quantized["out"], "quantized.json")
    assert restored["reference_kind"] == "quantized" and restored["reference"] == str(quantized["out"])
    assert "quantize output's quantizers restored" in text and "actions  L1" in text
    assert restored["samples"] == 4 and restored["action_l1"] is not None
    _, fp32, _ = verify(files["ckpt"], "fp32.json")
    assert fp32["reference_kind"] == "checkpoint" and fp32["samples"] == 4
    # the fp8 graphs compute what the restored quantizers do: closer to them than to the float32 checkpoint (on
    # these 4 frames of the random-init model: 3 vs 1 identical answers, action L1 0.21 vs 1.77)
    assert restored["identical_plans"] > fp32["identical_plans"]
    assert restored["action_l1"] < fp32["action_l1"]
    assert restored["max_prefill_prob_diff"] < fp32["max_prefill_prob_diff"]
    # neither a checkpoint nor a quantize output: refused naming the flag, before the bundle is read
    assert main(["verify", str(fp8_bundle), "--checkpoint", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--calib-source", "synthetic"], "--calib-source synthetic: this model answers in action chunks"),
    (["--calib-source", "nuscenes", "--calib-dataroot", "{nuscenes}"], "--calib-source nuscenes"),
    (["--calib-source", "lerobot", "--calib-dataroot", "{nuscenes}"], "--calib-dataroot"),
    (["--calib-source", "lerobot", "--calib-dataroot", "{dataset}", "--gate"], "--gate-source synthetic"),
])
def test_driving_calibration_for_a_robot_model_is_refused_naming_the_flag(
        argv: list[str], needle: str, files: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    nuscenes = tmp_path / "nuscenes"
    (nuscenes / "v1.0-mini").mkdir(parents=True)
    argv = [a.format(nuscenes=nuscenes, dataset=files["dataset"]) for a in argv]
    rc = main(["quantize", "--checkpoint", str(files["ckpt"]), "--recipe", "fp8", "--out", str(tmp_path / "q"),
               *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "q").exists()  # refused before any work


def test_a_driving_calibration_set_is_refused_for_a_robot_planner(files: dict[str, Path]) -> None:
    from blockpilot.calibration import CalibrationError, synthetic_calibration_source
    from blockpilot.quant.pipeline import load_planner, quantize_planner
    from blockpilot.quant.recipes import resolve_recipe
    from blockpilot.runtime.plan_types import DecoderSettings

    planner = load_planner(files["ckpt"], DecoderSettings(name="scaffold"))
    with pytest.raises(CalibrationError, match="--calib-source synthetic"):
        quantize_planner(planner, resolve_recipe("fp8"), synthetic_calibration_source(1, duration_s=2.0), 1,
                         cache_dir=files["root"] / "cache")


def test_export_with_a_recipe_refuses_to_calibrate_a_robot_model_on_driving_scenes(files: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    from blockpilot.export.bundle_export import export_bundle
    from blockpilot.formats.bundle import BundleError

    with pytest.raises(BundleError, match="--calib-source lerobot"):
        export_bundle(files["ckpt"], tmp_path / "b", recipe="fp8")
    assert not (tmp_path / "b").exists()


def test_a_quantize_output_plans_in_the_schema_it_was_quantized_for(tmp_path: Path) -> None:
    """``quantize --schema so101-ee`` on a checkpoint without its own: open_planner answers in the recorded schema."""
    from blockpilot.runtime.sources import PlannerSourceError, open_planner
    from blockpilot.vla.plans import DrivingSchema
    from blockpilot.vla.reference_model import write_reference_checkpoint
    from blockpilot.vla.schema_io import schema_to_dict

    ckpt = write_reference_checkpoint(tmp_path / "ckpt")  # no blockpilot.json: the driving layout
    out = tmp_path / "q" / "quantized"
    out.mkdir(parents=True)
    info = {"checkpoint": str(ckpt), "schema": schema_to_dict(ActionChunkSchema.so101_ee())}
    (out / "precision_map.json").write_text(json.dumps(info))
    restored: list[Path] = []
    planner = open_planner(tmp_path / "q", restore_quantized=lambda model, where: restored.append(where))
    assert planner.schema == ActionChunkSchema.so101_ee() and restored == [out]
    assert isinstance(open_planner(ckpt).schema, DrivingSchema)
    (out / "precision_map.json").write_text(json.dumps({**info, "schema": {"kind": "torques"}}))
    with pytest.raises(PlannerSourceError, match=r"precision_map\.json"):
        open_planner(tmp_path / "q", restore_quantized=lambda model, where: None)
