"""``blockpilot eval --closed-loop --world driving``: results, resuming a killed run, the shipped model driving, and
refusals naming their flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blockpilot.cli import main
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE
from blockpilot.vla.reference_model import SHIPPED_MODEL

SEED = HELDOUT_SEED_BASE
TIMING_KEYS = ("plan_ms_mean", "world_ms_per_plan")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["eval", "--closed-loop", "--world", "driving", "--no-progress", *argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def test_baselines_resume_a_killed_run_without_losing_or_repeating_an_episode(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ("--seeds", f"{SEED}:{SEED + 2}", "--max-steps", "60", "--out", str(out))
    rc, text, err = _cli(capsys, *argv)
    assert rc == 0, err
    assert "expert" in text and "cv" in text and "PDMS" in text
    full = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(full) == 5 and json.loads(full[0])["header"]["world"] == "driving"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["expert"]["episodes"] == 2
    assert summary["policies"]["expert"]["pdms"] > 0.9 and summary["policies"]["cv"]["episodes"] == 2
    report = (out / "report.md").read_text()
    assert "| expert | 2 |" in report and "| cv | 2 |" in report and (out / "plots" / "worst_bev.png").stat().st_size
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == sorted(
        f"{p}-{s}.npz" for p in ("expert", "cv") for s in (SEED, SEED + 1))
    (out / "results.jsonl").write_text("".join(full[:3]) + full[3][:40])  # killed while writing the third episode
    rc, _, err = _cli(capsys, *argv)
    assert rc == 0, err
    again = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert again[:3] == full[:3]
    ids = [json.loads(line)["sample_id"] for line in again[1:]]
    assert ids == [f"{p}/{s}" for s in (SEED, SEED + 1) for p in ("expert", "cv")]
    assert [_untimed(json.loads(a)) for a in again[1:]] == [_untimed(json.loads(b)) for b in full[1:]]
    rc, _, err = _cli(capsys, "--seeds", f"{SEED}:{SEED + 2}", "--max-steps", "50", "--out", str(out))
    assert rc == 2 and "results.jsonl" in err and "config" in err and "--overwrite" in err


def test_the_shipped_model_drives_alike_from_its_checkpoint_and_its_bundle(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], shipped_bundle: Path) -> None:
    records = {}
    for flag, model, backend in (("--checkpoint", SHIPPED_MODEL, "torch"), ("--bundle", shipped_bundle, "onnxruntime")):
        out = tmp_path / backend
        rc, text, err = _cli(capsys, flag, str(model), "--threads", "1", "--seeds", f"{SEED + 1}:{SEED + 2}",
                             "--max-steps", "20", "--baselines", "none", "--json", "--out", str(out))
        assert rc == 0, err
        summary = json.loads(text)
        assert summary["policies"]["model"]["episodes"] == 1 and summary["policies"]["model"]["failed"] == 0
        assert summary["header"]["model"] == str(model.resolve()) and summary["header"]["backend"] == backend
        records[backend] = json.loads((out / "results.jsonl").read_text().splitlines()[1])
    record = records["torch"]
    assert record["plans"] == 4 and record["plan_ms_mean"] > 0 and record["driving"]["driven_km"] > 0.005
    assert _untimed(records["onnxruntime"]) == _untimed(record)  # the same plans, so the same drive


@pytest.mark.parametrize(("argv", "flag"), [
    (("--seeds", "5:3"), "--seeds"),
    (("--baselines", "expert,hold"), "--baselines"),
    (("--baselines", "none"), "--checkpoint"),
    (("--execute", "2"), "--execute"),
    (("--cameras", "all"), "--cameras"),
    (("--max-steps", "500"), "--max-steps"),
    (("--source", "nuscenes", "--dataroot", "."), "--source"),
])
def test_bad_invocations_exit_2_naming_the_flag(argv: tuple[str, ...], flag: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert rc == 2 and flag in err, err
    assert not (tmp_path / "run").exists()
