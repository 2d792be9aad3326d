"""``blockpilot plan`` end to end: images read with Pillow, ego state as JSON, plan and statistics as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from blockpilot.cli import build_parser, main
from blockpilot.demo import road_image
from blockpilot.runtime.plan_types import DECODERS

EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'
STAGES = {"prompt", "vision", "prefill", "decode", "parse", "total"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockpilot.vla.reference import write_reference_checkpoint

    root = tmp_path_factory.mktemp("cli_plan")
    front, left = root / "front.png", root / "left.jpg"
    Image.fromarray(road_image(112)).save(front)
    Image.fromarray(road_image(140)).save(left)
    ego = root / "ego.json"
    ego.write_text(EGO)
    return {"ckpt": write_reference_checkpoint(root / "ckpt"), "front": front, "left": left, "ego": ego,
            "root": root}


def test_plan_prints_plan_and_statistics_as_json(files: dict[str, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "blockpilot.cli", "plan", "--checkpoint", str(files["ckpt"]),
                             "--image", str(files["front"]), "--ego", EGO, "--command", "go straight",
                             "--decoder", "scaffold"], capture_output=True, text=True, timeout=300)
    out = json.loads(result.stdout)
    # Exit 3: the model answered but the answer did not parse (the JSON is still printed).
    assert result.returncode == (0 if out["parse_error"] is None else 3), result.stderr
    assert set(out) >= {"waypoints", "behaviour", "text", "parse_error", "stats"}
    stats = out["stats"]
    assert stats["decoder"] == "scaffold" and stats["settings"]["threshold"] == 0.0
    assert stats["forwards"] == stats["prefill_forwards"] + stats["decode_forwards"] and stats["image_tokens"] == 16
    assert set(stats["stage_ms"]) == STAGES
    # The reference weights are random, so the answer usually does not parse: reported, not raised.
    assert (out["parse_error"] is None) == (out["waypoints"] is not None)
    if out["parse_error"] is not None:
        assert "did not parse" in result.stderr


def test_rollouts_with_two_cameras_and_ego_file(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "--checkpoint", str(files["ckpt"]), "--image", f"{files['front']},{files['left']}",
               "--ego", str(files["ego"]), "--command", "turn left", "--decoder", "rollouts", "--rollouts", "2",
               "--seed", "3"])
    out = json.loads(capsys.readouterr().out)
    assert rc == (0 if out["waypoints"] is not None else 3)
    assert out["rollouts"]["count"] == 2 and len(out["rollouts"]["parse_errors"]) == 2
    assert out["stats"]["rows"] == 2 and out["stats"]["settings"]["seed"] == 3
    # 112 px -> 4x4 merged tokens; 140 px is above the reference model's 112x112 pixel budget
    # (its preprocessor_config.json), so it is resized down to 112 px: 4x4 too.
    assert out["stats"]["image_tokens"] == 16 + 16


@pytest.mark.parametrize(("change", "message"), [
    ({"--image": "missing.png"}, "--image: no such file"),
    ({"--image": "ego.json"}, "cannot read"),
    ({"--ego": '{"past": [[0, 0]], "speed": 1.0'}, "--ego: not valid JSON"),
    ({"--ego": '{"past": [[0, 0]], "speed": 1.0}'}, "missing keys ['accel']"),
    ({"--ego": '{"past": [[0, 0]], "speed": NaN, "accel": 0}'}, "non-finite"),
    ({"--ego": "nowhere.json"}, "neither inline JSON nor an existing file"),
    ({"--command": "fly"}, "unknown route command 'fly'"),
    ({"--threshold": "2"}, "threshold must lie in [0, 1]"),
    ({"--checkpoint": "no_such_dir"}, "no_such_dir: does not exist"),
    ({"--max-prompt-tokens": "50"}, "max_prompt_tokens"),
])
def test_bad_arguments_exit_2_with_one_line(change: dict[str, str], message: str, files: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = {"--checkpoint": str(files["ckpt"]), "--image": str(files["front"]), "--ego": EGO,
            "--command": "go straight"}
    for key, value in change.items():
        local = files["root"] / value
        args[key] = str(local) if key in ("--image", "--checkpoint") or value.endswith(".json") else value
    rc = main(["plan", *[part for item in args.items() for part in item]])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.startswith("blockpilot plan: error:") and "Traceback" not in err


def test_mask_outside_the_vocabulary_names_mask_and_file(files: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in files["ckpt"].iterdir():
        (bad / f.name).symlink_to(f)
    config = json.loads((files["ckpt"] / "config.json").read_text())
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**config, "mask_token_id": 10**6}))
    rc = main(["plan", "--checkpoint", str(bad), "--image", str(files["front"]), "--ego", EGO])
    err = capsys.readouterr().err
    assert rc == 2 and "mask" in err and "config.json" in err


def test_decoder_choices_match_the_runtime() -> None:
    plan = build_parser()._subparsers._group_actions[0].choices["plan"]  # type: ignore[union-attr]
    decoder = next(a for a in plan._actions if a.dest == "decoder")
    assert tuple(decoder.choices) == DECODERS


PICK_PLACE = Path(__file__).resolve().parents[1] / "benchmarks" / "schemas" / "pick_place.json"


def test_plan_from_an_instruction_in_a_json_schema(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Random weights, but typed slots keep every value in its type: the answer parses into the schema's value.
    rc = main(["plan", "--checkpoint", str(files["ckpt"]), "--image", str(files["front"]),
               "--prompt", "Pick the red cube and place it in the bin.", "--schema", str(PICK_PLACE),
               "--decoder", "scaffold"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["parse_error"] is None, out["parse_error"]
    document = json.loads(PICK_PLACE.read_text())
    assert list(out["value"]) == list(document["properties"])
    assert out["waypoints"] is None and out["behaviour"] is None
    assert out["stats"]["constrained"] is True and out["stats"]["image_tokens"] == 16


def test_plan_from_an_instruction_equals_constrained_ar(files: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    texts = []
    for decoder in ("ar", "scaffold"):
        main(["plan", "--checkpoint", str(files["ckpt"]), "--image", str(files["front"]), "--prompt", "Tidy up.",
              "--schema", str(PICK_PLACE), "--decoder", decoder])
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize(("extra", "message"), [
    ([], "give --ego"),
    (["--ego", EGO, "--prompt", "go"], "alternatives"),
    (["--ego", EGO, "--system", "x"], "--system goes with --prompt"),
    (["--prompt", "   "], "instruction is empty"),
    (["--ego", EGO, "--schema", str(PICK_PLACE)], "needs a driving schema"),
])
def test_plan_refuses_mixed_inputs(files: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str],
                                   message: str) -> None:
    rc = main(["plan", "--checkpoint", str(files["ckpt"]), "--image", str(files["front"]), *extra])
    assert rc == 2 and message in capsys.readouterr().err


def test_a_planner_in_another_layout_refuses_driving_observations(files: dict[str, Path]) -> None:
    from blockpilot.runtime.plan_types import Observation, ObservationError
    from blockpilot.runtime.planner import Planner
    from blockpilot.vla.json_schema import load_json_schema
    from blockpilot.vla.prompt import EgoState

    planner = Planner.from_checkpoint(files["ckpt"], schema=load_json_schema(PICK_PLACE))
    ego = EgoState([[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], 5.0, 0.0)
    with pytest.raises(ObservationError, match="plan_text"):
        planner.plan(Observation([road_image(112)], ego, "go straight"))
