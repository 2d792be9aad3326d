"""Full-size camera frames: nuScenes keyframes with six 1600x900 JPEGs and WOD-E2E frames with eight full-size
cameras are replayed through the shipped checkpoint (torch) and through an exported bundle (ONNX Runtime), and
every sample with enough history is planned; the export takes the camera sizes (one vision graph each).

"Planned" is ``ok`` or ``parse_error``: the reference model was trained on one 112 px camera, so six or eight
cameras are out of its distribution and it may write a wrong word into a slot (typed slots are another change);
what these tests pin is that no sample fails or is refused for its frame size or camera count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blockpilot.cli import main
from blockpilot.eval.records import read_results
from blockpilot.sim.cameras import NUSCENES_CAMERAS, WOD_FULL_SIZE_CAMERAS, CameraSpec, full_size
from blockpilot.sim.generator import generate_scene
from blockpilot.sim.render import render_camera
from blockpilot.sim.types import Scene

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "reference"


def _upscaled(scene: Scene, step: int, camera: Any) -> np.ndarray:
    """The simulator's render at an eighth of the sensor's size, scaled up to it (the full-size render of six or
    eight cameras takes tens of seconds per frame on a CI CPU; the planner sees a full-size JPEG either way)."""
    small = full_size(camera, camera.name, camera.width // 8, camera.height // 8)
    image = Image.fromarray(render_camera(scene, step, small)).resize((camera.width, camera.height),
                                                                      Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockpilot.sim.writers.nuscenes import write_nuscenes
    from blockpilot.sim.writers.wod_e2e import write_wod_e2e

    root = tmp_path_factory.mktemp("full")
    nus = write_nuscenes([generate_scene(11, duration_s=5.5)], root / "nus", cameras=NUSCENES_CAMERAS,
                         render=_upscaled)
    wod = write_wod_e2e([generate_scene(11, duration_s=10.0)], root / "wod", cameras=WOD_FULL_SIZE_CAMERAS,
                        render=_upscaled)
    return {"nuscenes": nus, "wod": wod}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["export", "--checkpoint", str(SHIPPED_MODEL), "--out", str(out), "--quiet", "--cameras", "8",
                 "--image-size", "1600x900", "--image-size", "1920x1280", "--image-size", "1920x886"]) == 0
    return out


def test_the_writers_write_every_camera_at_full_size(datasets: dict[str, Path]) -> None:
    from blockpilot.eval.camera_rigs import NUSCENES_CAMERAS as NUS_ORDER
    from blockpilot.eval.camera_rigs import WOD_E2E_CAMERAS
    from blockpilot.eval.nuscenes import NuScenesSource
    from blockpilot.eval.types import EvalSample
    from blockpilot.eval.wod import WodE2ESource

    nus = [s for s in NuScenesSource(datasets["nuscenes"], cameras=NUS_ORDER) if isinstance(s, EvalSample)]
    images = nus[0].load_images()
    assert [im.shape for im in images] == [(900, 1600, 3)] * 6
    wod = [s for s in WodE2ESource(datasets["wod"], cameras=WOD_E2E_CAMERAS) if isinstance(s, EvalSample)]
    shapes = [im.shape[:2] for im in wod[0].load_images()]
    assert shapes == [(1280, 1920)] * 3 + [(886, 1920)] * 2 + [(1280, 1920)] * 3


def test_a_six_camera_nuscenes_prompt_fits_the_derived_budget(datasets: dict[str, Path]) -> None:
    from blockpilot.eval.camera_rigs import NUSCENES_CAMERAS as NUS_ORDER
    from blockpilot.eval.nuscenes import NuScenesSource
    from blockpilot.eval.types import EvalSample
    from blockpilot.runtime.plan_types import DecoderSettings, Observation
    from blockpilot.runtime.planner import Planner

    planner = Planner.from_checkpoint(SHIPPED_MODEL, decoder=DecoderSettings(name="scaffold"), cameras=6)
    sample = next(s for s in NuScenesSource(datasets["nuscenes"], cameras=NUS_ORDER)
                  if isinstance(s, EvalSample))
    plan = planner.plan(Observation(sample.load_images(), sample.ego, sample.route_command))
    # 1600x900 under the reference model's 112x112 pixel budget: 56x140 pixels, 2x5 merged tokens per camera.
    assert plan.stats.image_tokens == 6 * 10
    assert plan.stats.prompt_tokens <= planner.max_prompt_tokens and plan.text


def _replay(source: str, dataroot: Path, out: Path, model: list[str]) -> list[dict[str, Any]]:
    code = main(["eval", "--source", source, "--dataroot", str(dataroot), "--cameras", "all", "--out", str(out),
                 "--no-progress", *model])
    _, records = read_results(out / "results.jsonl")
    assert code == 0, [r.get("error") for r in records]
    return records


# nuScenes (six 1600x900 cameras, ~2 min on a loaded 2-core CPU) is `slow`; WOD-E2E (eight cameras) takes the same
# path, torch and bundle, in the default run.
@pytest.mark.parametrize("source", [pytest.param("nuscenes", marks=pytest.mark.slow), "wod"])
def test_full_size_replays_plan_every_sample_on_torch_and_on_a_bundle(source: str, datasets: dict[str, Path],
                                                                      bundle: Path, tmp_path: Path) -> None:
    torch_run = _replay(source, datasets[source], tmp_path / "torch", ["--checkpoint", str(SHIPPED_MODEL)])
    ort_run = _replay(source, datasets[source], tmp_path / "ort", ["--bundle", str(bundle)])
    planned = [r for r in torch_run if r["status"] != "skipped"]  # skipped: too little history recorded
    assert len(planned) >= 2
    assert all(r["status"] in ("ok", "parse_error") for r in planned), [(r["status"], r.get("error"))
                                                                         for r in planned]
    assert [r["status"] for r in ort_run] == [r["status"] for r in torch_run]
    # The bundle has a vision graph for every camera size, so it sees the very pixels torch sees.
    assert [r.get("text") for r in ort_run] == [r.get("text") for r in torch_run]


def test_the_bundle_records_one_vision_graph_per_size_and_inspect_shows_them(bundle: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    vision = [g for g in manifest["graphs"] if g["role"] == "vision"]
    sizes = sorted(tuple(g["io"]["graph"]["resized_hw"]) for g in vision)
    # Three camera sizes, two resized sizes: 1600x900 and 1920x886 both become 140x56 under 112x112 pixels.
    assert sizes == [(56, 140), (84, 112)]
    spec = json.loads((bundle / "graphs" / "decomposed" / "onnx_spec.json").read_text())
    assert spec["vision"]["policy"]["max_pixels"] == 112 * 112
    assert [tuple(s) for s in spec["vision"]["policy"]["sizes"]] == [tuple(g["resized_hw"])
                                                                     for g in spec["vision"]["graphs"]]
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "image policy min_pixels 3136, max_pixels 12544" in out
    assert "1600x900 -> 140x56 (10 tokens)" in out


def test_inspect_shows_the_checkpoints_policy_and_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(SHIPPED_MODEL)]) == 0
    out = capsys.readouterr().out
    assert "image policy min_pixels 3136, max_pixels 12544 (patch 14, merge 2: up to 16 tokens per image)" in out
    assert "1920x1280 -> 112x84 (12 tokens)" in out
    assert "prompt budget 1 camera 1024, 6 cameras 1024, 8 cameras 1024 tokens" in out


def test_eval_bundle_honours_max_prompt_tokens(datasets: dict[str, Path], bundle: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--source", "nuscenes", "--dataroot", str(datasets["nuscenes"]), "--cameras", "all",
            "--bundle", str(bundle), "--no-progress", "--limit", "5"]
    assert main([*base, "--out", str(tmp_path / "a"), "--max-prompt-tokens", "100"]) == 1
    _, records = read_results(tmp_path / "a" / "results.jsonl")
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and all("fits at most 100" in r["error"] and "re-export the bundle with a larger "
                          "--max-prompt-tokens" in r["error"] for r in failed)
    assert main([*base, "--out", str(tmp_path / "b"), "--max-prompt-tokens", "100000"]) == 2
    assert "re-export the bundle" in capsys.readouterr().err


def test_wod_camera_rig_for_a_single_stream_source_is_refused() -> None:
    from blockpilot.eval.camera_rigs import rig_cameras
    from blockpilot.eval.types import DatasetError

    with pytest.raises(DatasetError, match="mcap source has one camera stream"):
        rig_cameras("mcap")


def test_full_size_cameras_keep_the_field_of_view() -> None:
    front = NUSCENES_CAMERAS[0]
    assert (front.name, front.width, front.height) == ("CAM_FRONT", 1600, 900)
    small = CameraSpec.level("X", 112, 112, 70.0, 1.5, 0.0, 1.6)
    big = full_size(small, "X", 1600, 900)
    assert big.fx / big.width == pytest.approx(small.fx / small.width)
