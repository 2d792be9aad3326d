"""The quality gate's decision on hand-built fp32 / quantized runs (L2 at 3 s bound, parse-rate drop)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_record_fixtures import T2, failed, scored, write_run

from blockpilot.eval.compare import compare_runs
from blockpilot.quant.gate import decide


def _runs(tmp_path: Path, quant_offset: float, quant_parse_error: bool = False) -> dict:
    # fp32: L2 at 3 s is 1.0 m on both samples (a lateral offset of 1 m at every step).
    a = [scored("s1", T2, 5.0, (0.0, 1.0)), scored("s2", T2, 8.0, (0.0, 1.0)), failed("s3")]
    b = [scored("s1", T2, 5.0, (0.0, quant_offset)), scored("s2", T2, 8.0, (0.0, quant_offset)), failed("s3")]
    if quant_parse_error:
        b.append(scored("s4", T2, 6.0, (0.0, 0.0), status="parse_error"))
        a.append(scored("s4", T2, 6.0, (0.0, 1.0)))
    write_run(tmp_path / "fp32" / "results.jsonl", a)
    write_run(tmp_path / "q" / "results.jsonl", b)
    return compare_runs(tmp_path / "fp32", tmp_path / "q")


@pytest.mark.parametrize(("offset", "passed"), [(1.04, True), (1.05, True), (1.06, False), (0.5, True)])
def test_l2_bound(tmp_path: Path, offset: float, passed: bool) -> None:
    result = decide(_runs(tmp_path, offset), l2_bound=0.05)
    # L2 at 3 s: 1.0 m -> offset m, a change of (offset - 1) / 1
    assert result.l2_3s_fp32 == pytest.approx(1.0) and result.l2_3s_quant == pytest.approx(offset)
    assert result.l2_change == pytest.approx(offset - 1.0)
    assert result.passed is passed
    assert result.samples == 2 and "UniAD at 3 s" in result.table
    if not passed:
        assert "L2 at 3 s grew +6.0%" in result.reasons[0]


def test_parse_rate_drop_fails(tmp_path: Path) -> None:
    result = decide(_runs(tmp_path, 1.0, quant_parse_error=True))
    # fp32 parsed 3 of 3, the quantized model 2 of 3; L2 compares the 2 samples parsed in both (no change).
    assert result.l2_change == pytest.approx(0.0)
    assert result.parse_rate_fp32 == pytest.approx(1.0) and result.parse_rate_quant == pytest.approx(2 / 3)
    assert not result.passed and "parse rate dropped" in result.reasons[0]
    assert decide(_runs(tmp_path, 1.0, quant_parse_error=True), parse_drop=0.5).passed
