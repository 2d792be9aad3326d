"""Every aggregation convention of ``blockpilot.eval.summary`` against numbers worked out by hand."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blockpilot.eval.summary import summarize, worst_cases

T2 = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # nuScenes: 2 Hz to 3 s
T4 = [0.25 * (i + 1) for i in range(20)]  # WOD-E2E: 4 Hz to 5 s


def metric(l2: list[float | None], times: list[float] | None = None, valid: list[bool] | None = None,
           **extra: Any) -> dict[str, Any]:
    times = times or T2
    return {"times_s": times, "l2": l2, "valid": valid if valid is not None else [v is not None for v in l2],
            "coll_stp3": None, "coll_stp3_gt": None, "coll_bev": None, "rfs": None, **extra}


def record(sample_id: str, model: dict[str, Any] | None = None, cv: dict[str, Any] | None = None,
           status: str = "ok", error: str | None = None, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    metrics = {k: v for k, v in (("model", model), ("cv", cv)) if v is not None}
    return {"sample_id": sample_id, "status": status, "error": error, "metrics": metrics, "stats": stats}


def model_of(summary: dict[str, Any]) -> dict[str, Any]:
    return summary["model"]


def test_l2_both_conventions() -> None:
    s = summarize([record("a", metric([1, 2, 3, 4, 5, 6])), record("b", metric([3, 3, 3, 3, 3, 3]))])
    l2 = model_of(s)["l2"]
    assert l2["samples"] == 2
    # ST-P3/VAD: a = 1.5, 2.5, 3.5 (means of the steps up to t); b = 3 throughout
    assert l2["stp3_vad"] == pytest.approx({"1": 2.25, "2": 2.75, "3": 3.25, "avg": 2.75})
    # UniAD: a = 2, 4, 6 (the step at t); b = 3
    assert l2["uniad"] == pytest.approx({"1": 2.5, "2": 3.5, "3": 4.5, "avg": 3.5})


def test_single_sample_matches_the_brief() -> None:
    s = summarize([record("a", metric([1, 2, 3, 4, 5, 6])), record("b", metric([1, 2, 3, 4, 5, 6]))])
    assert model_of(s)["l2"]["stp3_vad"]["1"] == pytest.approx(1.5)
    assert model_of(s)["l2"]["uniad"]["1"] == pytest.approx(2.0)


def test_partial_futures_are_excluded_and_counted() -> None:
    full = record("full", metric([1, 2, 3, 4, 5, 6]))
    invalid_tail = record("tail", metric([9, 9, 9, 9, 9, 9], valid=[True] * 4 + [False] * 2))
    short = record("short", metric([9, 9, 9], times=[0.5, 1.0, 1.5]))
    null_l2 = record("null", metric([9, 9, 9, 9, None, None]))
    other_grid = record("grid", metric([9, 9, 9], times=[0.75, 1.5, 3.0]))
    s = summarize([full, invalid_tail, short, null_l2, other_grid])
    m = model_of(s)
    assert m["scored"] == 5
    assert m["full_future"] == 1
    assert m["excluded_partial_future"] == 3
    assert m["excluded_other"] == 1
    assert m["l2"]["uniad"]["3"] == pytest.approx(6.0)


def test_collision_excludes_ground_truth_collisions() -> None:
    a = metric([0] * 6, coll_stp3=[False, True, False, False, False, True],
               coll_stp3_gt=[False, False, False, False, False, True])
    b = metric([0] * 6, coll_stp3=[False] * 6, coll_stp3_gt=[False] * 6)
    unscored = metric([0] * 6)  # no collision data: not in the collision sample set
    s = summarize([record("a", a), record("b", b), record("c", unscored)])
    c = model_of(s)["collision"]
    assert c["samples"] == 2
    # a's hits: [0, 1, 0, 0, 0, 0] (the last step is the ground truth's own collision)
    assert c["stp3_vad"]["1"] == pytest.approx(100 * (1 / 2) / 2)
    assert c["stp3_vad"]["2"] == pytest.approx(100 * (1 / 4) / 2)
    assert c["stp3_vad"]["3"] == pytest.approx(100 * (1 / 6) / 2)
    assert c["uniad"] == pytest.approx({"1": 50.0, "2": 0.0, "3": 0.0, "avg": 50 / 3})
    assert c["gt_collision_steps"] == 1
    assert c["gt_collision_samples"] == 1


def test_collision_without_gt_series_counts_every_hit() -> None:
    a = metric([0] * 6, coll_stp3=[False] * 5 + [True], coll_stp3_gt=None)
    c = model_of(summarize([record("a", a)]))["collision"]
    assert c["uniad"]["3"] == pytest.approx(100.0)
    assert c["stp3_vad"]["3"] == pytest.approx(100 / 6)
    assert c["gt_collision_steps"] == 0


def test_bev_collision_is_the_max_over_steps_without_exclusion() -> None:
    a = metric([0] * 6, coll_bev=[False, True, False, False, False, False])
    b = metric([0] * 6, coll_bev=[False] * 5 + [True], coll_stp3=[False] * 6, coll_stp3_gt=[False] * 5 + [True])
    c = metric([0] * 6, coll_bev=[False] * 6)
    cp = model_of(summarize([record("a", a), record("b", b), record("c", c)]))["collision"]
    assert cp["bev_samples"] == 3
    assert cp["bev_planner"]["1"] == pytest.approx(100 / 3)
    assert cp["bev_planner"]["2"] == pytest.approx(100 / 3)
    assert cp["bev_planner"]["3"] == pytest.approx(200 / 3)


def test_ade_fde_need_the_full_horizon() -> None:
    nus = summarize([record("a", metric([1, 2, 3, 4, 5, 6]))])
    af = model_of(nus)["ade_fde"]
    assert af["3"] == pytest.approx({"samples": 1, "ade": 3.5, "fde": 6.0})
    assert af["5"] == {"samples": 0, "ade": None, "fde": None}  # 2 Hz data to 3 s

    wod = metric(list(T4), times=T4)  # l2 = t
    cut = metric(list(T4), times=T4, valid=[True] * 15 + [False] * 5)  # invalid after 3.75 s
    af = model_of(summarize([record("w", wod), record("x", cut)]))["ade_fde"]
    assert af["5"]["samples"] == 1
    assert af["5"]["ade"] == pytest.approx(sum(T4) / 20)
    assert af["5"]["fde"] == pytest.approx(5.0)
    assert af["3"]["samples"] == 2
    assert af["3"]["ade"] == pytest.approx(sum(T4[:12]) / 12)
    assert af["3"]["fde"] == pytest.approx(3.0)


def test_rfs() -> None:
    r1 = metric(list(T4), times=T4, rfs={"score": 8.0, "per_horizon": {"3": 9.0, "5": 7.0}, "in_trust_region": True})
    r2 = metric(list(T4), times=T4, rfs={"score": 6.0, "per_horizon": {"3": 5.0, "5": 7.0}, "in_trust_region": False})
    s = summarize([record("a", r1), record("b", r2), record("c", metric([1] * 6))])
    rfs = model_of(s)["rfs"]
    assert (rfs["samples"], rfs["mean"], rfs["in_trust_region_pct"]) == (2, pytest.approx(7.0), pytest.approx(50.0))
    assert rfs["per_horizon"] == pytest.approx({"3": 7.0, "5": 7.0})
    assert s["cv"]["rfs"] == {"samples": 0, "mean": None, "per_horizon": {}, "in_trust_region_pct": None}


def test_counts_parse_rate_and_failures() -> None:
    recs = [record(k, metric([1] * 6), cv=metric([1] * 6)) for k in "abc"]
    recs += [record("p", status="parse_error", error="no waypoints", cv=metric([2] * 6)),
            record("f", status="failed", error="image missing"), record("s", status="skipped", error="no history")]
    s = summarize(recs)
    counts = s["counts"]
    assert counts["total"] == 6
    assert [counts[k] for k in ("ok", "parse_error", "failed", "skipped")] == [3, 1, 1, 1]
    assert counts["parse_rate"] == pytest.approx(0.75)
    assert counts["failures"] == [{"sample_id": "p", "status": "parse_error", "error": "no waypoints"},
                                  {"sample_id": "f", "status": "failed", "error": "image missing"}]
    # the constant-velocity baseline is scored on the model's samples only, not on the parse error
    assert s["model"]["scored"] == 3
    assert s["cv"]["scored"] == 3
    assert s["cv"]["l2"]["uniad"]["3"] == pytest.approx(1.0)
    assert summarize([record("f", status="failed")])["counts"]["parse_rate"] is None


def test_latency_percentiles() -> None:
    recs = [record(str(i), metric([1] * 6), stats={"stage_ms": {"vision": ms / 2, "total": ms}, "forwards": fw,
                                                    "tokens_per_forward": tpf})
            for i, (ms, fw, tpf) in enumerate([(10, 4, 2.0), (20, 6, 3.0), (30, 8, 4.0), (40, 2, 1.0), (50, 5, 5.0)])]
    recs.append(record("failed", status="failed"))  # no stats: not counted
    lat = summarize(recs)["latency"]
    assert lat["samples"] == 5
    assert list(lat["stages_ms"]) == ["vision", "total"]
    assert lat["stages_ms"]["total"] == pytest.approx({"samples": 5, "p50": 30.0, "p90": 46.0, "p99": 49.6,
                                                       "mean": 30.0})
    assert lat["stages_ms"]["vision"]["p90"] == pytest.approx(23.0)
    assert lat["forwards_per_plan"] == pytest.approx(5.0)
    assert lat["tokens_per_forward"] == pytest.approx(3.0)


def test_worst_cases_rank_by_the_last_valid_step() -> None:
    recs = [record("a", metric([1, 1, 1, 1, 1, 2]), cv=metric([0, 0, 0, 0, 0, 3])),
            record("b", metric([1, 1, 1, 9, None, None])),  # partial future: ranked by its 2 s step
            record("c", metric([1, 1, 1, 1, 1, 5])), record("p", status="parse_error", cv=metric([7] * 6))]
    rows = worst_cases(recs)
    assert [r["sample_id"] for r in rows] == ["b", "c", "a"]
    assert rows[0]["t_last_s"] == pytest.approx(2.0)
    assert rows[0]["l2_3s"] is None
    assert rows[2]["l2_3s"] == pytest.approx(2.0)
    assert rows[2]["cv_l2_3s"] == pytest.approx(3.0)
    assert len(worst_cases(recs, limit=1)) == 1


def test_empty_run_is_json_ready_and_keeps_the_header() -> None:
    header = {"decoder": "fast", "checkpoint": "models/reference"}
    s = summarize([], header=header)
    json.dumps(s, allow_nan=False)
    assert s["run"] == header
    assert model_of(s)["l2"]["stp3_vad"] == {"1": None, "2": None, "3": None, "avg": None}
    assert model_of(s)["collision"]["bev_planner"]["avg"] is None
    assert s["latency"]["stages_ms"] == {}
    assert s["latency"]["forwards_per_plan"] is None


def test_non_finite_values_never_leak() -> None:
    s = summarize([record("a", metric([1, 2, 3, 4, 5, 6]), stats={"stage_ms": {"total": None}, "forwards": None})])
    json.dumps(s, allow_nan=False)
    assert s["latency"]["stages_ms"] == {}
