"""The replay quality gate: the fp32 and the quantized planner over the same held-out recordings,
compared on the samples both scored; the quantized model fails when L2 at 3 s grows by more than a
bound (default 5 %) or the parse rate drops.

L2 at 3 s is the UniAD convention (the error at 3 s, :mod:`blockpilot.eval.summary`) on the samples
whose plan parsed in both runs; the ST-P3/VAD average is shown beside it in the table.

An action-chunk model is gated on robot frames (a LeRobot dataset, :func:`run_robot_gate`): the quantized chunks
against the fp32 chunks on the samples both parsed, over the rows that are not padding: the mean absolute
difference (action L1, in the schema's action units) must stay within a bound (default 0.05) and the parse rate
must not drop; the largest absolute difference and both models' L1 against the recorded actions are reported.

The closed loop is one more metric source for the same decision (``--gate-closed-loop EPISODES``,
:func:`run_closed_loop_gate`): both planners drive the same held-out seeds of the synthetic driving world
(:mod:`blockpilot.eval.drive_closed_loop`) and the quantized build fails when its mean PDMS falls more than a bound
(default 0.05, PDMS in 0..1) below fp32's, paired per seed (:mod:`blockpilot.eval.drive_compare`).
:func:`with_closed_loop` adds the closed loop's verdict to a replay result (or makes one on its own, for
``export``), and :func:`finish_gate` writes ``gate.json``, prints the verdict and raises :class:`QualityGateError`
(exit status 1) when the build failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from ..errors import BlockpilotError
from ..eval.compare import compare_runs, format_comparison
from ..eval.replay import evaluate_and_report, run_header
from ..eval.types import Source
from ..sim.drive.episode import DriveConfig

DEFAULT_L2_BOUND = 0.05
DEFAULT_PARSE_DROP = 0.0
DEFAULT_ACTION_L1_BOUND = 0.05
DEFAULT_PDMS_BOUND = 0.05
CLOSED_LOOP_DIR = "closed_loop"


class QualityGateError(BlockpilotError):
    """The build failed its quality gate (``gate.json`` holds the numbers)."""

    exit_code = 1  # a check failed, as ``verify`` and the replay gate


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    l2_3s_fp32: float | None
    l2_3s_quant: float | None
    l2_change: float | None  # relative: 0.03 = 3 % worse
    parse_rate_fp32: float | None
    parse_rate_quant: float | None
    samples: int
    table: str
    metric: str = "l2_3s"  # or "action_l1_vs_fp32" (an action-chunk model)
    action_l1_vs_fp32: float | None = None  # mean |quantized - fp32| over the compared chunk rows
    action_max_abs_diff_vs_fp32: float | None = None
    action_l1_vs_target: dict[str, float | None] | None = None  # {"fp32": .., "quantized": ..}
    closed_loop: dict[str, Any] | None = None  # the paired closed-loop scores, the bound, the run directory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(cmp: dict[str, Any], *, l2_bound: float = DEFAULT_L2_BOUND,
           parse_drop: float = DEFAULT_PARSE_DROP) -> GateResult:
    """Pass or fail from a :func:`~blockpilot.eval.compare.compare_runs` result (A = fp32, B = quantized)."""
    sa, sb = cmp["summaries"]["a"], cmp["summaries"]["b"]
    la, lb = sa["model"]["l2"]["uniad"]["3"], sb["model"]["l2"]["uniad"]["3"]
    pa, pb = sa["counts"]["parse_rate"], sb["counts"]["parse_rate"]
    reasons = []
    change = None
    if la is None or lb is None:
        reasons.append("no sample with a parsed plan and a 3 s ground truth in both runs: L2 at 3 s cannot be compared")
    else:
        change = (lb - la) / la if la > 0 else (0.0 if lb <= la else float("inf"))
        if change > l2_bound + 1e-9:  # exactly at the bound passes
            reasons.append(f"L2 at 3 s grew {change:+.1%} ({la:.3f} -> {lb:.3f} m), over the {l2_bound:.1%} bound")
    if pa is None or pb is None:
        reasons.append("no parse rate to compare (no sample was planned)")
    elif pb < pa - parse_drop - 1e-12:
        reasons.append(f"parse rate dropped from {pa:.2%} to {pb:.2%} (allowed drop {parse_drop:.2%})")
    return GateResult(passed=not reasons, reasons=tuple(reasons), l2_3s_fp32=la, l2_3s_quant=lb, l2_change=change,
                      parse_rate_fp32=pa, parse_rate_quant=pb, samples=int(cmp["common"]),
                      table=format_comparison(cmp))


def run_gate(fp32_planner: Any, quant_planner: Any, make_source: Callable[[], Source], out_dir: Path, *,
             checkpoint: Path, precision: str, l2_bound: float = DEFAULT_L2_BOUND,
             parse_drop: float = DEFAULT_PARSE_DROP, progress: bool = False, limit: int | None = None) -> GateResult:
    """Replay ``make_source()`` through both planners into ``out_dir/fp32`` and ``out_dir/<precision>``,
    compare them into ``out_dir/compare`` and decide."""
    runs = {}
    for name, planner in (("fp32", fp32_planner), (precision, quant_planner)):
        source = make_source()
        header = {**run_header(source, checkpoint, planner), "precision": name}
        evaluate_and_report(planner, source, out_dir / name, header=header, limit=limit, overwrite=True,
                            progress=progress, quiet=True)
        runs[name] = out_dir / name
    cmp = compare_runs(runs["fp32"], runs[precision], out_dir=out_dir / "compare")
    return decide(cmp, l2_bound=l2_bound, parse_drop=parse_drop)


def _parse_rate(records: list[dict[str, Any]]) -> float | None:
    planned = [r for r in records if r["status"] in ("ok", "parse_error")]
    return sum(r["status"] == "ok" for r in planned) / len(planned) if planned else None


def decide_robot(fp32: list[dict[str, Any]], quant: list[dict[str, Any]], *,
                 l1_bound: float = DEFAULT_ACTION_L1_BOUND, parse_drop: float = DEFAULT_PARSE_DROP) -> GateResult:
    """Pass or fail from two robot replays of the same samples (:func:`blockpilot.eval.robot_eval.replay_robot`
    records, fp32 first): action L1 / max abs diff of the quantized chunks against the fp32 ones."""
    import numpy as np

    by_index = {r["index"]: r for r in quant}
    pairs = [(a, by_index[a["index"]]) for a in fp32
             if a.get("pred") is not None and by_index.get(a["index"], {}).get("pred") is not None]
    reasons = []
    l1 = worst = None
    to_target: dict[str, float | None] = {"fp32": None, "quantized": None}
    if pairs:
        valid = np.stack([~np.asarray(a["pad"], bool) for a, _ in pairs])  # (n, K)
        pa, pb = (np.stack([np.asarray(r["pred"], np.float64) for r in run]) for run in zip(*pairs, strict=True))
        target = np.stack([np.asarray(a["target"], np.float64) for a, _ in pairs])
        diff = np.abs(pb - pa)[valid]
        l1, worst = float(diff.mean()), float(diff.max())
        to_target = {"fp32": float(np.abs(pa - target)[valid].mean()),
                     "quantized": float(np.abs(pb - target)[valid].mean())}
        if l1 > l1_bound + 1e-9:
            reasons.append(f"action L1 against fp32 is {l1:.4f}, over the {l1_bound:g} bound (max |diff| {worst:.4f})")
    else:
        reasons.append("no sample parsed in both runs: the action chunks cannot be compared")
    ra, rb = _parse_rate(fp32), _parse_rate(quant)
    if ra is None or rb is None:
        reasons.append("no parse rate to compare (no sample was planned)")
    elif rb < ra - parse_drop - 1e-12:
        reasons.append(f"parse rate dropped from {ra:.2%} to {rb:.2%} (allowed drop {parse_drop:.2%})")

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    table = ("| metric | fp32 | quantized |\n|---|---|---|\n"
             f"| action L1 vs recorded | {cell(to_target['fp32'])} | {cell(to_target['quantized'])} |\n"
             f"| parse rate | {cell(ra)} | {cell(rb)} |\n"
             f"| action L1 vs fp32 | - | {cell(l1)} |\n| max abs diff vs fp32 | - | {cell(worst)} |")
    return GateResult(passed=not reasons, reasons=tuple(reasons), l2_3s_fp32=None, l2_3s_quant=None, l2_change=None,
                      parse_rate_fp32=ra, parse_rate_quant=rb, samples=len(pairs), table=table,
                      metric="action_l1_vs_fp32", action_l1_vs_fp32=l1, action_max_abs_diff_vs_fp32=worst,
                      action_l1_vs_target=to_target)


def run_robot_gate(fp32_planner: Any, quant_planner: Any, source: Any, out_dir: Path, *, precision: str,
                   l1_bound: float = DEFAULT_ACTION_L1_BOUND, parse_drop: float = DEFAULT_PARSE_DROP,
                   limit: int | None = None) -> GateResult:
    """Replay the robot frames of ``source`` (a :class:`~blockpilot.calibration.robot.LeRobotCalibrationSource`)
    through both planners into ``out_dir/fp32`` and ``out_dir/<precision>`` (each a robot eval run: results and
    report) and decide with :func:`decide_robot`."""
    from ..eval.robot_eval import replay_robot, write_robot_run
    from ..eval.robot_metrics import robot_metrics

    runs = []
    for name, planner in (("fp32", fp32_planner), (precision, quant_planner)):
        records, facts = replay_robot(planner, source.replay, limit=limit)
        write_robot_run(out_dir / name, records, robot_metrics(records, facts))
        runs.append(records)
    return decide_robot(runs[0], runs[1], l1_bound=l1_bound, parse_drop=parse_drop)


def closed_loop_reasons(paired: dict[str, Any], pdms_bound: float) -> list[str]:
    """Why the closed loop fails the candidate (:func:`~blockpilot.eval.drive_compare.paired_difference`, reference
    fp32): its mean PDMS fell more than ``pdms_bound`` below the reference's, or no seed was driven by both."""
    pdms = paired["pdms"]
    if pdms["mean_diff"] is None:
        return ["closed loop: no seed driven by both builds: PDMS cannot be compared"]
    if -pdms["mean_diff"] > pdms_bound + 1e-9:  # exactly at the bound passes
        ci = pdms["ci95"]
        return [f"closed-loop PDMS fell {-pdms['mean_diff']:.3f} ({pdms['reference_mean']:.3f} -> "
                f"{pdms['candidate_mean']:.3f} over {paired['episodes']} episodes"
                + ("" if ci is None else f", 95 % CI of the difference {ci[0]:+.3f}..{ci[1]:+.3f}")
                + f"), over the {pdms_bound:g} bound"]
    return []


def closed_loop_table(paired: dict[str, Any]) -> str:
    rows = []
    for name in ("pdms", "driving_score"):
        p = paired[name]
        ci = "n/a" if p["ci95"] is None else f"{p['ci95'][0]:+.3f}..{p['ci95'][1]:+.3f}"
        cells = [("n/a" if p[k] is None else f"{p[k]:.3f}") for k in ("reference_mean", "candidate_mean")]
        diff = "n/a" if p["mean_diff"] is None else f"{p['mean_diff']:+.3f}"
        rows.append(f"| closed-loop {name} | {cells[0]} | {cells[1]} | {diff} ({ci}) |")
    return (f"| metric | {paired['reference']} | {paired['candidate']} | paired difference (95 % CI) |\n"
            "|---|---|---|---|\n" + "\n".join(rows))


def with_closed_loop(result: GateResult | None, paired: dict[str, Any], *, pdms_bound: float = DEFAULT_PDMS_BOUND,
                     run_dir: Path | None = None) -> GateResult:
    """``result`` (a replay gate's, or None: the closed loop alone) with the closed loop's numbers and verdict."""
    reasons = closed_loop_reasons(paired, pdms_bound)
    record = {"pdms_bound": pdms_bound, "episodes": paired["episodes"], "seeds": paired["seeds"],
              "pdms": paired["pdms"], "driving_score": paired["driving_score"],
              "run": None if run_dir is None else str(run_dir), "passed": not reasons}
    table = closed_loop_table(paired)
    if result is None:
        return GateResult(passed=not reasons, reasons=tuple(reasons), l2_3s_fp32=None, l2_3s_quant=None,
                          l2_change=None, parse_rate_fp32=None, parse_rate_quant=None, samples=paired["episodes"],
                          table=table, metric="closed_loop_pdms", closed_loop=record)
    return replace(result, passed=result.passed and not reasons, reasons=(*result.reasons, *reasons),
                   table=result.table + "\n\n" + table, closed_loop=record)


def run_closed_loop_gate(fp32_policy: Any, candidate_policy: Any, out_dir: Path, *, episodes: int,
                         config: DriveConfig | None = None, candidate: str = "quantized",
                         progress: bool = False) -> dict[str, Any]:
    """Drive ``episodes`` held-out seeds (``config``: the episode settings) with both policies (planners, or
    ``(world) -> DrivePolicy`` factories) into ``out_dir`` (a closed-loop run: results, summary, report; started
    afresh) and return their paired differences, fp32 the reference."""
    from ..eval.drive_closed_loop import drive_header, progress_line, run_drive
    from ..eval.synthetic import HELDOUT_SEED_BASE
    from ..runtime.backend import BackendError

    seeds = range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + episodes)
    config = config or DriveConfig()
    policies = [("fp32", _policy_factory(fp32_policy, "fp32")),
                (candidate, _policy_factory(candidate_policy, candidate))]
    summary = run_drive(policies, seeds, config, out_dir, header=drive_header(config, seeds), overwrite=True,
                        errors=(BackendError,), on_episode=progress_line if progress else None,
                        pair=("fp32", candidate))
    paired: dict[str, Any] = summary["paired"]
    return paired


def _policy_factory(policy: Any, name: str) -> Any:
    """A planner becomes a factory of :class:`~blockpilot.eval.drive_policy.PlannerDrivePolicy`; a factory stays."""
    if hasattr(policy, "plan") and not isinstance(policy, type):  # a planner (a policy class is a factory)
        from ..eval.drive_policy import PlannerDrivePolicy

        return lambda world: PlannerDrivePolicy(policy, name=name)
    return policy


def finish_gate(result: GateResult, gate_dir: Path, summary_line: str, *, stream: TextIO | None = None) -> int:
    """Write ``gate_dir/gate.json``, print the table and the verdict (on ``stream``, default stdout); 0 when the
    build passed, else :class:`QualityGateError` (exit status 1)."""
    import json
    import sys

    from ..atomic_io import atomic_write

    stream = stream or sys.stdout
    print(result.table, file=stream)
    gate_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(gate_dir / "gate.json", json.dumps(result.to_dict(), indent=2) + "\n")
    verdict = "PASSED" if result.passed else "FAILED: " + "; ".join(result.reasons)
    print(f"quality gate  {verdict} ({summary_line})", file=stream)
    if not result.passed:
        raise QualityGateError(f"quality gate failed ({gate_dir / 'gate.json'}): " + "; ".join(result.reasons))
    return 0
