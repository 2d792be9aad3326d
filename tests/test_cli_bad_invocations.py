"""Bad invocations of every ``blockpilot`` command: one line on stderr naming the flag or file, the documented exit
code, no traceback, and nothing loaded or written first (issue 21 item 4).

Each case runs in-process through ``cli.main`` (argparse's own errors end in ``SystemExit(2)`` as usual); only
``--version``, Ctrl-C and a closed stdout run in a fresh process, because they are about the process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from eval_record_fixtures import T2, scored, write_run

import blockpilot
from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL

EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small inputs, good and bad, made once: the shipped checkpoint, a truncated copy, broken files and runs."""
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt_ckpt"
    shutil.copytree(SHIPPED_MODEL, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    bad_config = root / "bad_config"
    shutil.copytree(SHIPPED_MODEL, bad_config)
    (bad_config / "config.json").write_text("{not json")
    (root / "empty").mkdir()
    (root / "bad_bundle").mkdir()
    (root / "bad_bundle" / "manifest.json").write_text("{not json")
    (root / "afile.txt").write_text("not a directory\n")
    (root / "bad.png").write_text("not an image\n")
    (root / "bad_schema.json").write_text(json.dumps({"type": "object", "properties": 5}))
    (root / "existing").mkdir()
    write_run(root / "run_a" / "results.jsonl", [scored("s1", T2, 5.0, (0.0, 0.0))])
    write_run(root / "run_b" / "results.jsonl", [scored("s2", T2, 5.0, (0.0, 0.0))])
    (root / "run_bad").mkdir()
    (root / "run_bad" / "results.jsonl").write_text("{not json\n")
    (root / "nuscenes_empty").mkdir()
    names = ["corrupt_ckpt", "bad_config", "empty", "bad_bundle", "afile.txt", "bad.png", "bad_schema.json",
             "existing", "run_a", "run_b", "run_bad", "nuscenes_empty"]
    return {"ckpt": str(SHIPPED_MODEL), "missing": str(root / "missing"), "root": str(root),
            **{n.split(".")[0]: str(root / n) for n in names}}


# (argv with {placeholders} from `files`, exit code, substrings stderr must hold)
CASES: list[tuple[str, list[str], int, tuple[str, ...]]] = [
    ("no-command", [], 2, ("COMMAND",)),
    ("unknown-command", ["fly"], 2, ("invalid choice", "fly")),
    # inspect
    ("inspect-missing", ["inspect", "{missing}"], 2, ("{missing}", "no such checkpoint or bundle")),
    ("inspect-empty-dir", ["inspect", "{empty}"], 2, ("config.json",)),
    ("inspect-truncated-weights", ["inspect", "{corrupt_ckpt}"], 2, ("model.safetensors",)),
    ("inspect-corrupt-bundle", ["inspect", "{bad_bundle}"], 2, ("manifest.json",)),
    ("inspect-corrupt-config", ["inspect", "{bad_config}"], 2, ("config.json",)),
    # scaffold
    ("scaffold-missing-schema", ["scaffold", "--schema", "{missing}"], 2, ("--schema",)),
    ("scaffold-corrupt-schema", ["scaffold", "--schema", "{bad_schema}"], 2, ("--schema", "properties")),
    ("scaffold-missing-checkpoint", ["scaffold", "--checkpoint", "{missing}"], 2, ("--checkpoint", "{missing}")),
    # plan
    ("plan-missing-checkpoint", ["plan", "--checkpoint", "{missing}", "--ego", EGO], 2, ("--checkpoint",)),
    ("plan-no-config", ["plan", "--checkpoint", "{empty}", "--ego", EGO], 2, ("--checkpoint", "config.json")),
    ("plan-no-input", ["plan", "--checkpoint", "{ckpt}"], 2, ("--ego", "--prompt")),
    ("plan-bad-ego", ["plan", "--checkpoint", "{ckpt}", "--ego", '{"past": 1}'], 2, ("--ego",)),
    ("plan-missing-ego-file", ["plan", "--checkpoint", "{ckpt}", "--ego", "{missing}"], 2, ("--ego", "{missing}")),
    ("plan-missing-image", ["plan", "--checkpoint", "{ckpt}", "--ego", EGO, "--image", "{missing}"], 2,
     ("--image", "{missing}")),
    ("plan-corrupt-image", ["plan", "--checkpoint", "{ckpt}", "--ego", EGO, "--image", "{bad}"], 2,
     ("--image", "bad.png")),
    ("plan-no-image-for-vla", ["plan", "--checkpoint", "{ckpt}", "--ego", EGO], 2, ("--image is required",)),
    ("plan-rollouts-0", ["plan", "--checkpoint", "{ckpt}", "--ego", EGO, "--rollouts", "0"], 2, ("--rollouts",)),
    ("plan-threshold-2", ["plan", "--checkpoint", "{ckpt}", "--ego", EGO, "--threshold", "2"], 2, ("--threshold",)),
    ("plan-temperature-0", ["plan", "--checkpoint", "{ckpt}", "--ego", EGO, "--temperature", "0"], 2,
     ("--temperature",)),
    # export
    ("export-missing-checkpoint", ["export", "--checkpoint", "{missing}", "--out", "{root}/b1"], 2,
     ("--checkpoint", "{missing}")),
    ("export-existing-out", ["export", "--checkpoint", "{ckpt}", "--out", "{existing}"], 2, ("--out", "--overwrite")),
    ("export-out-is-file", ["export", "--checkpoint", "{ckpt}", "--out", "{afile}", "--overwrite"], 2,
     ("--out", "afile.txt", "file")),
    ("export-unknown-target", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b2", "--target", "jetson"], 2,
     ("--target", "jetson")),
    ("export-recipe-gate", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b3", "--target", "orin",
                            "--recipe", "fp8"], 2, ("--recipe", "orin")),
    ("export-recipe-not-in-bundles", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b4", "--recipe",
                                      "nvfp4"], 2, ("--recipe nvfp4", "fp8")),
    ("export-unknown-recipe", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b5", "--recipe", "fp3"], 2,
     ("--recipe", "fp3")),
    ("export-calib-0", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b6", "--calib", "0"], 2, ("--calib",)),
    ("export-cameras-0", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b7", "--cameras", "0"], 2,
     ("--cameras",)),
    ("export-image-size", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b8", "--image-size", "wide"], 2,
     ("--image-size",)),
    ("export-corrupt-config", ["export", "--checkpoint", "{bad_config}", "--out", "{root}/b9"], 2, ("config.json",)),
    # verify
    ("verify-missing-bundle", ["verify", "{missing}"], 2, ("{missing}",)),
    ("verify-not-a-bundle", ["verify", "{empty}"], 2, ("manifest.json",)),
    ("verify-corrupt-bundle", ["verify", "{bad_bundle}"], 2, ("manifest.json",)),
    ("verify-samples-0", ["verify", "{bad_bundle}", "--samples", "0"], 2, ("--samples",)),
    ("verify-tolerance-negative", ["verify", "{bad_bundle}", "--tolerance", "-1"], 2, ("--tolerance",)),
    ("verify-missing-checkpoint", ["verify", "{bad_bundle}", "--checkpoint", "{missing}"], 2, ("--checkpoint",)),
    ("verify-json-out-is-dir", ["verify", "{bad_bundle}", "--json-out", "{existing}"], 2, ("--json-out",)),
    ("verify-missing-trusted-key", ["verify", "{bad_bundle}", "--trusted-key", "{missing}"], 2,
     ("--trusted-key", "{missing}")),
    # signing (keygen, sign, export --sign)
    ("keygen-no-out", ["keygen"], 2, ("--out",)),
    ("keygen-bad-name", ["keygen", "--out", "{root}/keys", "--name", "../up"], 2, ("../up",)),
    ("sign-not-a-bundle", ["sign", "{empty}", "--key", "{afile}"], 2, ("BUNDLE", "manifest.json")),
    ("sign-key-not-pem", ["sign", "{bad_bundle}", "--key", "{afile}"], 2, ("afile.txt", "not a PEM file")),
    ("export-sign-not-pem", ["export", "--checkpoint", "{ckpt}", "--out", "{root}/b9", "--sign", "{afile}"], 2,
     ("afile.txt", "not a PEM file")),
    # eval
    ("eval-no-model", ["eval", "--source", "nuscenes", "--dataroot", "{empty}"], 2, ("--checkpoint", "--bundle")),
    ("eval-missing-checkpoint", ["eval", "--source", "nuscenes", "--dataroot", "{empty}", "--checkpoint",
                                 "{missing}"], 2, ("--checkpoint", "{missing}")),
    ("eval-missing-bundle", ["eval", "--source", "nuscenes", "--dataroot", "{empty}", "--bundle", "{missing}"], 2,
     ("--bundle", "{missing}")),
    ("eval-missing-dataroot", ["eval", "--source", "nuscenes", "--dataroot", "{missing}", "--checkpoint", "{ckpt}"],
     2, ("--dataroot", "{missing}")),
    ("eval-no-source", ["eval", "--checkpoint", "{ckpt}"], 2, ("--source",)),
    ("eval-empty-dataroot", ["eval", "--source", "nuscenes", "--dataroot", "{nuscenes_empty}", "--checkpoint",
                             "{ckpt}", "--out", "{root}/e1"], 2, ("nuscenes_empty",)),
    ("eval-out-is-file", ["eval", "--source", "nuscenes", "--dataroot", "{empty}", "--checkpoint", "{ckpt}",
                          "--out", "{afile}"], 2, ("--out", "afile.txt")),
    ("eval-threshold-negative", ["eval", "--threshold", "-1"], 2, ("--threshold",)),
    ("eval-limit-0", ["eval", "--limit", "0"], 2, ("--limit",)),
    ("eval-unknown-decoder", ["eval", "--decoder", "beam"], 2, ("--decoder", "beam")),
    # eval compare: missing runs and runs with nothing in common exit 1; a corrupt results file is bad input (2)
    ("compare-missing-run", ["eval", "compare", "{missing}", "{run_a}"], 1, ("{missing}",)),
    ("compare-run-without-results", ["eval", "compare", "{run_a}", "{empty}"], 1, ("{empty}", "results.jsonl")),
    ("compare-nothing-in-common", ["eval", "compare", "{run_a}", "{run_b}"], 1, ("in common",)),
    ("compare-corrupt-results", ["eval", "compare", "{run_a}", "{run_bad}"], 2, ("results.jsonl",)),
    # quantize
    ("quantize-gate-bound-negative", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--gate-bound", "-1"],
     2, ("--gate-bound",)),
    ("quantize-parse-drop", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--gate-parse-drop", "2"], 2,
     ("--gate-parse-drop",)),
    ("quantize-unknown-recipe", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp3"], 2, ("--recipe", "fp3")),
    ("quantize-unknown-target", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--target", "jetson"], 2,
     ("--target", "jetson")),
    ("quantize-missing-checkpoint", ["quantize", "--checkpoint", "{missing}", "--recipe", "fp8"], 2,
     ("--checkpoint", "{missing}")),
    ("quantize-calib-dataroot", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--calib-source",
                                 "nuscenes"], 2, ("--calib-dataroot",)),
    ("quantize-gate-dataroot", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--gate", "--gate-source",
                                "wod", "--gate-dataroot", "{missing}"], 2, ("--gate-dataroot", "{missing}")),
    ("quantize-out-is-file", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--out", "{afile}"], 2,
     ("--out", "afile.txt")),
    ("quantize-gate-refuses", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "nvfp4", "--target", "orin",
                               "--out", "{root}/q1"], 2, ("nvfp4", "orin")),
    ("quantize-calib-0", ["quantize", "--checkpoint", "{ckpt}", "--recipe", "fp8", "--calib", "0"], 2, ("--calib",)),
    # bench
    ("bench-repeats-0", ["bench", "--repeats", "0"], 2, ("--repeats",)),
    ("bench-unknown-model", ["bench", "--models", "7b"], 2, ("--models", "7b")),
    ("bench-unknown-decoder", ["bench", "--decoders", "beam"], 2, ("--decoders", "beam")),
    ("bench-threads-0", ["bench", "--threads", "0"], 2, ("--threads",)),
    ("bench-missing-checkpoint", ["bench", "--checkpoint", "{missing}", "--out", "{root}/bench.json"], 2,
     ("--checkpoint", "{missing}")),
    ("bench-out-is-dir", ["bench", "--out", "{existing}"], 2, ("--out",)),
    ("bench-scale-unknown-shape", ["bench", "scale", "--shape", "70b"], 2, ("--shape", "70b")),
    # jetson
    ("jetson-bench-missing-bundle", ["jetson", "bench", "--bundle", "{missing}"], 2, ("--bundle", "{missing}")),
    ("jetson-bench-samples-0", ["jetson", "bench", "--checkpoint", "{ckpt}", "--samples", "0"], 2, ("--samples",)),
    ("jetson-bench-model-required", ["jetson", "bench"], 2, ("--bundle", "--checkpoint")),
    ("jetson-build-off-jetson", ["jetson", "build", "--checkpoint", "{ckpt}", "--out", "{root}/j1", "--root",
                                 "{empty}"], 2, ("Jetson",)),
    ("jetson-power-max-clocks-alone", ["jetson", "power", "--max-clocks"], 2, ("--max-clocks", "--mode")),
    # ros
    ("ros-score-missing-recorded", ["ros", "score", "--recorded", "{missing}", "--source", "{empty}"], 2,
     ("--recorded", "{missing}")),
    ("ros-score-missing-source", ["ros", "score", "--recorded", "{empty}", "--source", "{missing}"], 2,
     ("--source", "{missing}")),
    ("ros-score-rate-0", ["ros", "score", "--recorded", "{empty}", "--source", "{empty}", "--waypoint-rate-hz", "0"],
     2, ("--waypoint-rate-hz",)),
    ("ros-replay-missing-bag", ["ros", "replay", "{missing}"], 2, ("{missing}",)),
    ("ros-replay-negative-rate", ["ros", "replay", "{empty}", "--rate", "-1"], 2, ("--rate",)),
    ("ros-record-existing-out", ["ros", "record", "--out", "{existing}"], 2, ("--out", "{existing}")),
    ("ros-planner-missing-params", ["ros", "planner", "--params", "{missing}"], 2, ("--params", "{missing}")),
    # train-reference and demo
    ("train-steps-0", ["train-reference", "--out", "{root}/t1", "--steps", "0"], 2, ("--steps",)),
    ("train-lr-0", ["train-reference", "--out", "{root}/t2", "--lr", "0"], 2, ("--lr",)),
    ("train-seeds-overlap", ["train-reference", "--out", "{root}/t3", "--train-seeds", "4", "--eval-seeds", "2"], 2,
     ("--eval-seeds", "--train-seeds")),
    ("train-seeds-garbage", ["train-reference", "--out", "{root}/t4", "--train-seeds", "a:b"], 2, ("--train-seeds",)),
    ("train-out-is-file", ["train-reference", "--out", "{afile}"], 2, ("--out", "afile.txt")),
    ("train-robot-dart-fraction", ["train-robot", "--out", "{root}/r1", "--dart-fraction", "2"], 2,
     ("--dart-fraction",)),
    ("train-robot-seeds-overlap", ["train-robot", "--out", "{root}/r2", "--train-seeds", "4", "--eval-seeds", "2"], 2,
     ("--eval-seeds", "--train-seeds")),
    ("train-robot-bad-record", ["train-robot", "--out", "{root}/r3", "--record", "replay"], 2, ("--record",)),
    ("demo-out-is-file", ["demo", "--out", "{afile}"], 2, ("--out", "afile.txt")),
    ("demo-image-size", ["demo", "--image-size", "8"], 2, ("--image-size",)),
]


def _invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_there_are_enough_cases_and_every_command_has_some() -> None:
    assert len(CASES) >= 40
    from blockpilot.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    covered = {argv[0] for _, argv, _, _ in CASES if argv}
    assert commands - {"train-reference"} <= covered | {"train"}, commands - covered
    assert "train-reference" in covered


@pytest.mark.parametrize(("argv", "code", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_invocation(argv: list[str], code: int, needles: tuple[str, ...], files: dict[str, str],
                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(**files) if "{" in a and not a.startswith("{\"") else a for a in argv]
    rc, _, err = _invoke(argv, capsys)
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockpilot"), err
    for needle in needles:
        assert needle.format(**files) in err, (needle, err)


def test_nothing_was_written_by_the_refusals(files: dict[str, str]) -> None:
    root = Path(files["root"])
    assert not [p.name for p in root.iterdir() if p.name[0] in "bejqt" and p.name[1:].isdigit()]
    assert not (root / "bench.json").exists()
    assert list((root / "existing").iterdir()) == []


def _blockpilot(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "blockpilot.cli", *args], text=True, **kwargs)  # type: ignore


def test_version_prints_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "blockpilot.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"blockpilot {blockpilot.__version__}"


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path: Path) -> None:
    proc = _blockpilot("train-reference", "--out", str(tmp_path / "t"), "--steps", "1000000", "--train-seeds", "2",
                       "--eval-seeds", "5:6", "--cache-dir", "", "--device", "cpu", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    # Interrupt once training runs (its first log line is out). Ctrl-C during the start-up imports is caught the
    # same way, but CPython may then end the process by SIGINT itself (an interrupt inside an extension's init).
    while not proc.stdout.readline().startswith("data:"):
        assert proc.poll() is None, "train-reference ended before training"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or killed by SIGINT (which a shell also shows as 130): CPython ends the process by the signal itself when
    # the interrupt went through C code that runs Python (torch's), even though main caught it.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "interrupted; rerun with the same --out to resume" in err and "Traceback" not in err


def test_ctrl_c_in_process_returns_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import blockpilot.cli as cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_scaffold", interrupted)
    assert cli.main(["scaffold"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "blockpilot scaffold: interrupted; rerun with the same --out to resume"


def test_a_closed_pipe_exits_quietly() -> None:
    # The reader goes away before the command writes: `blockpilot scaffold | head -0`, deterministically.
    proc = _blockpilot("scaffold", "--schema", "robot", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == ""
