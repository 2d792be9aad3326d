"""The replay quality gate: the fp32 and the quantized planner over the same held-out recordings,
compared on the samples both scored; the quantized model fails when L2 at 3 s grows by more than a
bound (default 5 %) or the parse rate drops.

L2 at 3 s is the UniAD convention (the error at 3 s, :mod:`blockpilot.eval.summary`) on the samples
whose plan parsed in both runs; the ST-P3/VAD average is shown beside it in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..eval.compare import compare_runs, format_comparison
from ..eval.replay import evaluate_and_report, run_header
from ..eval.types import Source

DEFAULT_L2_BOUND = 0.05
DEFAULT_PARSE_DROP = 0.0


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
