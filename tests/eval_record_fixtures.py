"""Hand-built per-sample result records (the schema of blockpilot.eval.records) for report,
comparison and quality-gate tests: no planner, no dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blockpilot.eval.records import ResultsWriter

T2 = [0.5 * (i + 1) for i in range(6)]
T4 = [0.25 * (i + 1) for i in range(20)]
HEADER = {"source": "nuscenes", "decoder": "fast", "checkpoint": "models/reference", "frame": "ego"}


def scored(sample_id: str, times: list[float], speed: float, pred_offset: tuple[float, float], *,
           status: str = "ok", agents: bool = False, raters: bool = False, total_ms: float = 40.0) -> dict[str, Any]:
    """A record driving straight at ``speed``; the model is off by ``pred_offset``, cv by 2 % of the distance."""
    gt = np.array([[speed * t, 0.1 * t * t] for t in times])
    model = gt + np.array(pred_offset)
    cv = gt * np.array([1.02, 0.0])
    n = len(times)

    def metric(pred: np.ndarray) -> dict[str, Any]:
        m: dict[str, Any] = {"times_s": times, "l2": np.linalg.norm(pred - gt, axis=1).tolist(), "valid": [True] * n,
                             "coll_stp3": [False] * (n - 1) + [True], "coll_stp3_gt": [False] * n,
                             "coll_bev": [False] * n, "rfs": None}
        if raters:
            m["rfs"] = {"score": 7.5, "per_horizon": {"3": 8.0, "5": 7.0}, "in_trust_region": True}
        return m

    record: dict[str, Any] = {
        "sample_id": sample_id, "source": "wod" if raters else "nuscenes", "scene": "s0", "timestamp_us": 0,
        "status": status, "error": None if status == "ok" else "no waypoints in the answer",
        "route_command": "straight", "speed_mps": speed, "frame": "ego",
        "gt": {"times_s": times, "xy": gt.tolist(), "valid": [True] * n}, "agents": None, "raters": [],
        "predictions": {"model": {"times_s": times, "xy": model.tolist(),
                                  "behaviour": {"longitudinal": "keep speed", "lateral": "keep lane"}},
                        "cv": {"times_s": times, "xy": cv.tolist()}},
        "metrics": {"model": metric(model), "cv": metric(cv)},
        "stats": {"stage_ms": {"vision": total_ms / 4, "decode": total_ms * 3 / 4, "total": total_ms},
                  "forwards": 8, "tokens_per_forward": 3.5},
        "text": "",
    }
    if agents:
        record["agents"] = {"times_s": times,
                            "boxes": [[[6.0 + speed * t * 0.5, 3.5, 0.0, 4.5, 1.9], [12.0, -4.0, 1.57, 0.6, 0.6]]
                                      for t in times],
                            "kinds": [["vehicle", "pedestrian"] for _ in times]}
    if raters:
        record["raters"] = [{"xy": (gt + np.array([0.0, dy])).tolist(), "score": s}
                            for dy, s in ((0.0, 10.0), (1.5, 6.0))]
    if status == "parse_error":
        del record["predictions"]["model"], record["metrics"]["model"]
    return record


def failed(sample_id: str, error: str = "image missing: samples/CAM_FRONT/x.jpg") -> dict[str, Any]:
    return {"sample_id": sample_id, "source": "nuscenes", "status": "failed", "error": error, "gt": None,
            "agents": None, "raters": [], "predictions": {}, "metrics": {}, "stats": None, "text": ""}


def write_run(path: Path, records: list[dict[str, Any]], header: dict[str, Any] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with ResultsWriter(path, header=HEADER if header is None else header) as w:
        for r in records:
            w.write(r)
    return path
