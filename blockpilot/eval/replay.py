"""Replaying a recorded dataset through a planner, as a library: open a source, the header a run is tied to,
evaluate and write the report. ``blockpilot eval`` (:mod:`blockpilot.eval.cli`), ``blockpilot quantize``'s
replay gate and the demo all run replays through these functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import BlockpilotError
from .types import Source

SOURCES = ("nuscenes", "wod", "mcap")


class EvalUsageError(BlockpilotError, ValueError):
    """A bad ``blockpilot eval`` invocation (missing option, unknown source)."""


def parse_cameras(kind: str, text: str | None) -> tuple[str, ...] | None:
    """``--cameras``: ``None`` (the source's default), ``all`` (the rig's cameras in prompt order) or a list."""
    if not text:
        return None
    if text.strip().lower() == "all":
        from .camera_rigs import rig_cameras

        return rig_cameras(kind)
    return tuple(c.strip() for c in text.split(","))


def open_source(kind: str, dataroot: str | Path, *, cameras: tuple[str, ...] | None = None, version: str = "auto",
                frame: str = "ego", scenes: list[str] | None = None, stride: int = 1,
                image_topic: str = "/camera/front/image_raw/compressed", odom_topic: str = "/odom",
                route_topic: str = "/route_command") -> Source:
    """A replay source of ``kind`` (nuscenes, wod, mcap) over a local dataset copy."""
    if kind == "nuscenes":
        from .nuscenes import NuScenesSource

        return NuScenesSource(dataroot, version, frame=frame, cameras=cameras or ("CAM_FRONT",), scenes=scenes,
                              keyframe_stride=stride)
    if kind == "wod":
        from .wod import WodE2ESource

        return WodE2ESource(dataroot, cameras=cameras or ("FRONT",))
    if kind == "mcap":
        from .mcap import Rosbag2Source

        return Rosbag2Source(dataroot, image_topic=image_topic, odom_topic=odom_topic, route_topic=route_topic)
    raise EvalUsageError(f"unknown source {kind!r}; expected one of {SOURCES}")


def run_header(source: Source, checkpoint: Path, planner: Any) -> dict[str, Any]:
    """The settings a results file is tied to (a resume must match them)."""
    import blockpilot

    return {
        "source": {"name": source.name, **source.describe()},
        "checkpoint": str(checkpoint.resolve()),
        "decoder": planner.settings.to_dict(),
        "schema": {"num_waypoints": int(planner.schema.num_waypoints), "rate_hz": float(planner.schema.rate_hz)},
        "blockpilot": getattr(blockpilot, "__version__", "dev"),
    }


def driving_schema(checkpoint: Path, spec: str | None) -> Any:
    """The shared ``--schema`` option resolved for a driving planner (None: the checkpoint's own)."""
    if spec is None:
        return None
    from ..vla.plans import DrivingSchema
    from ..vla.schema_io import resolve_schema

    schema = resolve_schema(checkpoint, spec)
    if not isinstance(schema, DrivingSchema):
        raise EvalUsageError(f"--schema {spec}: replays plan driving and need a driving schema, got "
                             f"{type(schema).__name__}")
    return schema


def evaluate_and_report(planner: Any, source: Source, out: Path, *, header: dict[str, Any], limit: int | None = None,
                        overwrite: bool = False, progress: bool = True, quiet: bool = False,
                        map_samples: Any = None) -> int:
    """Replay ``source`` into ``out`` and write the report; ``map_samples``: plan elsewhere (e.g. on Ray workers,
    :mod:`.ray_pool`; see :func:`~.evaluator.run_evaluation`). 1 when no sample could be planned on, else 0."""
    from .evaluator import REPORT_DIR, run_evaluation
    from .report import write_report
    from .summary import skipped_line

    summary = run_evaluation(planner, source, out, header=header, limit=limit, overwrite=overwrite,
                             progress=progress, map_samples=map_samples)
    report = write_report(summary.results, out / REPORT_DIR)
    metrics = json.loads((report / "metrics.json").read_text())
    counts = metrics["counts"]
    why_skipped = skipped_line(counts)
    if not quiet:
        print(headline(metrics))
        print(f"{summary.written} samples evaluated, {summary.resumed} resumed; counts {summary.counts}")
        if why_skipped:
            print(why_skipped)
        print(f"results: {summary.results}\nreport:  {report / 'summary.md'} (and summary.html, plots/)")
    if counts["failed"]:
        first = next(f for f in counts["failures"] if f["status"] == "failed")
        print(f"blockpilot eval: {counts['failed']} of {counts['total']} samples failed; first: "
              f"{first['sample_id']}: {first['error']}", file=sys.stderr)
    if counts["total"] and not counts["ok"] + counts["parse_error"]:
        print(f"blockpilot eval: error: no sample of {counts['total']} could be planned on "
              f"({counts['failed']} failed, {counts['skipped']} skipped); the report lists why"
              f"{'; ' + why_skipped if why_skipped else ''}", file=sys.stderr)
        return 1
    return 0


def headline(metrics: dict[str, Any]) -> str:
    """Two lines for a terminal: L2 both conventions, collisions and parse rate, model vs CV."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = []
    for who in ("model", "cv"):
        m = metrics.get(who) or {}
        l2 = m.get("l2", {})
        avg = l2.get("stp3_vad", {}) or {}
        at = l2.get("uniad", {}) or {}
        coll = (m.get("collision", {}) or {}).get("stp3_vad", {}) or {}
        lines.append(f"{who:5s} L2 avg-up-to-t 1/2/3 s {fmt(avg.get('1'))}/{fmt(avg.get('2'))}/{fmt(avg.get('3'))} m"
                     f"  at-t {fmt(at.get('1'))}/{fmt(at.get('2'))}/{fmt(at.get('3'))} m"
                     f"  collision(ST-P3) 3 s {fmt(coll.get('3'))} %")
    counts, latency = metrics.get("counts") or {}, metrics.get("latency") or {}
    if counts.get("parse_rate") is not None:
        planned = counts.get("ok", 0) + counts.get("parse_error", 0)
        lines.append(f"plans parsed {100 * counts['parse_rate']:.2f} % ({counts.get('ok', 0)}/{planned}), "
                     f"{fmt(latency.get('forwards_per_plan'))} forwards per plan, "
                     f"{fmt(latency.get('tokens_per_forward'))} answer tokens per decode forward")
    return "\n".join(lines)
