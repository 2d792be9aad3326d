"""Two builds in one closed-loop run (``eval --closed-loop --world driving --compare-bundle``), the closed-loop
quality gate of ``export`` / ``quantize`` (``--gate-closed-loop``) and the closed-loop HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blockpilot.cli import main
from blockpilot.eval.drive_closed_loop_cli import drive_config
from blockpilot.eval.drive_compare import bootstrap_mean_ci, paired_difference
from blockpilot.eval.synthetic import HELDOUT_SEED_BASE
from blockpilot.quant.gate import QualityGateError, finish_gate, run_closed_loop_gate, with_closed_loop
from blockpilot.sim.drive.policies import ExpertPolicy
from blockpilot.vla.reference_model import SHIPPED_MODEL

SEED = HELDOUT_SEED_BASE
POLICIES = ("model", "compare", "expert", "cv")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


class StandStill:
    """A build that no longer drives: every plan keeps the car where it is."""

    name = "stand-still"

    def plan(self, observation: Any) -> np.ndarray:
        return np.zeros((6, 2))


def test_checkpoint_and_its_bundle_drive_the_same_seeds_in_one_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], shipped_bundle: Path) -> None:
    out = tmp_path / "run"
    rc, text, err = _run(capsys, "eval", "--closed-loop", "--world", "driving", "--no-progress", "--threads", "1",
                         "--checkpoint", str(SHIPPED_MODEL), "--compare-bundle", str(shipped_bundle),
                         "--seeds", f"{SEED}:{SEED + 2}", "--max-steps", "10", "--json", "--out", str(out))
    assert rc == 0, err
    summary = json.loads(text)
    assert list(summary["policies"]) == list(POLICIES)
    assert summary["header"]["backend"] == "torch"
    assert summary["header"]["compare"]["backend"] == "onnxruntime"
    assert summary["header"]["compare"]["model"] == str(shipped_bundle.resolve())
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    assert [r["sample_id"] for r in records] == [f"{p}/{s}" for s in (SEED, SEED + 1) for p in POLICIES]
    assert all(r["status"] == "ok" and r["plans"] == 2 for r in records if r["policy"] in ("model", "compare"))
    paired = summary["paired"]
    assert paired["reference"] == "model" and paired["candidate"] == "compare" and paired["seeds"] == [SEED, SEED + 1]
    for name, group in (("pdms", "pdm"), ("driving_score", "driving")):
        by = {(r["policy"], r["seed"]): r[group][name] for r in records}
        assert paired[name]["per_seed"] == {str(s): by[("compare", s)] - by[("model", s)] for s in (SEED, SEED + 1)}
        assert paired[name]["reference_mean"] == pytest.approx(np.mean([by[("model", s)] for s in (SEED, SEED + 1)]))
        assert abs(paired[name]["mean_diff"]) < 1e-6  # the same weights plan the same drive on either backend
        low, high = paired[name]["ci95"]
        assert low <= paired[name]["mean_diff"] <= high
    # The report: HTML beside summary.json, every policy named, the plots and the BEV strip embedded.
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Paired: compare - model" in page
    for name in POLICIES:
        assert f"<td>{name}</td>" in page
    for png in ("subscores.png", "score_distribution.png", "worst_bev.png"):
        assert f'src="plots/{png}"' in page and (out / "plots" / png).stat().st_size > 0
    assert page.count("<tr>") >= 2 * len(POLICIES) + len(POLICIES)  # the policy rows and one row per episode
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]  # nothing half-written


def test_compare_bundle_refusals_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("eval", "--closed-loop", "--world", "driving", "--no-progress", "--out", str(tmp_path / "r"))
    rc, _, err = _run(capsys, *base, "--compare-bundle", str(SHIPPED_MODEL))
    assert rc == 2 and "--compare-bundle" in err and "--checkpoint" in err
    rc, _, err = _run(capsys, *base, "--checkpoint", str(SHIPPED_MODEL), "--compare-bundle", str(tmp_path / "none"))
    assert rc == 2 and "--compare-bundle" in err
    rc, _, err = _run(capsys, "eval", "--closed-loop", "--compare-bundle", str(SHIPPED_MODEL), "--checkpoint",
                      str(SHIPPED_MODEL), "--out", str(tmp_path / "r"))
    assert rc == 2 and "--compare-bundle" in err and "--world driving" in err


def test_export_gate_passes_the_bundle_of_the_same_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    rc, out, err = _run(capsys, "export", "--checkpoint", str(SHIPPED_MODEL), "--out", str(bundle), "--quiet",
                        "--gate-closed-loop", "2", "--gate-max-steps", "10", "--gate-pdms-bound", "0")
    assert rc == 0, err
    gate = json.loads((tmp_path / "bundle-gate" / "gate.json").read_text())
    assert gate["passed"] and gate["metric"] == "closed_loop_pdms" and gate["samples"] == 2
    loop = gate["closed_loop"]
    assert loop["pdms_bound"] == 0 and loop["seeds"] == [SEED, SEED + 1] and loop["passed"]
    assert loop["pdms"]["mean_diff"] == pytest.approx(0.0, abs=1e-6) and loop["pdms"]["reference_mean"] > 0.5
    assert "quality gate  PASSED" in out and (tmp_path / "bundle-gate" / "closed_loop" / "report.html").is_file()
    assert (bundle / "manifest.json").is_file()


@pytest.mark.parametrize(("argv", "flag"), [
    (("--gate-closed-loop", "2", "--gate-pdms-bound", "-1"), "argument --gate-pdms-bound"),
    (("--gate-closed-loop", "2", "--gate-pdms-bound", "1.5"), "argument --gate-pdms-bound"),
    (("--gate-closed-loop", "0",), "argument --gate-closed-loop"),
    (("--gate-closed-loop", "2", "--gate-max-steps", "1000"), "--gate-max-steps 1000"),
    (("--gate-pdms-bound", "0.1"), "--gate-pdms-bound goes with --gate-closed-loop"),
])
@pytest.mark.parametrize("command", ["export", "quantize"])
def test_closed_loop_gate_flags_are_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, argv: tuple[str, ...], flag: str) -> None:
    out = tmp_path / "out"
    base = ("export", "--out", str(out)) if command == "export" else ("quantize", "--recipe", "fp8", "--out", str(out))
    rc, _, err = _run(capsys, *base, "--checkpoint", str(SHIPPED_MODEL), *argv)
    assert rc == 2 and flag in err
    assert not out.exists()


def test_the_gate_fails_a_build_that_drives_worse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paired = run_closed_loop_gate(ExpertPolicy, lambda world: StandStill(), tmp_path / "loop", episodes=2,
                                  config=drive_config(20), candidate="stand-still")
    assert paired["episodes"] == 2 and paired["pdms"]["mean_diff"] < -0.05
    assert with_closed_loop(None, paired, pdms_bound=0.99).passed  # a bound wider than the drop passes
    result = with_closed_loop(None, paired, pdms_bound=0.0)
    assert not result.passed and "closed-loop PDMS fell" in result.reasons[0]
    with pytest.raises(QualityGateError) as failed:
        finish_gate(result, tmp_path / "gate", "closed loop")
    assert failed.value.exit_code == 1 and "gate.json" in str(failed.value)
    assert "quality gate  FAILED" in capsys.readouterr().out
    gate = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert not gate["passed"] and gate["closed_loop"]["pdms"]["mean_diff"] == paired["pdms"]["mean_diff"]
    assert (tmp_path / "loop" / "report.html").is_file()


def test_closed_loop_joins_a_replay_verdict() -> None:
    from blockpilot.quant.gate import GateResult

    replay = GateResult(passed=True, reasons=(), l2_3s_fp32=1.0, l2_3s_quant=1.01, l2_change=0.01,
                        parse_rate_fp32=1.0, parse_rate_quant=1.0, samples=8, table="| L2 |")
    records = [{"policy": p, "seed": s, "status": "ok", "pdm": {"pdms": v}, "driving": {"driving_score": v}}
               for p, s, v in (("fp32", 1, 0.9), ("fp8", 1, 0.7), ("fp32", 2, 0.8), ("fp8", 2, 0.8))]
    records.append({"policy": "fp8", "seed": 3, "status": "failed"})  # no fp32 episode on seed 3: not paired
    paired = paired_difference(records, "fp32", "fp8")
    assert paired["seeds"] == [1, 2] and paired["pdms"]["mean_diff"] == pytest.approx(-0.1)
    joined = with_closed_loop(replay, paired, pdms_bound=0.05)
    assert not joined.passed and joined.l2_3s_quant == 1.01 and joined.table.startswith("| L2 |")
    assert joined.closed_loop is not None and joined.closed_loop["pdms"]["candidate_mean"] == pytest.approx(0.75)
    assert with_closed_loop(replay, paired, pdms_bound=0.1).passed  # exactly at the bound passes
    assert bootstrap_mean_ci([0.5]) is None
    low, high = bootstrap_mean_ci([0.0, 1.0, 0.0, 1.0])  # type: ignore[misc]
    assert 0.0 <= low < 0.5 < high <= 1.0
