"""Replay a LeRobot dataset through a manipulation planner (``blockpilot eval --source lerobot``).

Each frame becomes a :class:`~blockpilot.runtime.plan_types.RobotObservation`: the dataset's ``observation.state``
and ``action`` columns are mapped onto the schema's joint ``state_dims`` and ``dims`` by name (a trailing ``.pos``
is ignored; a feature without names maps by position when its size matches); state dims derived from the
simulator's state (``block_dx``, ...) are composed from ``observation.environment_state`` and
``observation.ee_pose`` by :func:`~blockpilot.vla.robot_state.compose_state`, as training and the closed loop do.
A dataset whose dims cannot be mapped is refused before any planning with :class:`RobotDimsError`, naming the
feature. One bad sample (unreadable frame,
refused observation, full cache) is recorded with its reason and the replay goes on, as the driving evaluator does.

Scored beside the model: the **repeat-last-action** baseline, which repeats the episode's previous action for every
step of the chunk (an episode's first frame has no previous action, so the baseline skips it). Metrics and the
gripper rule are in :mod:`blockpilot.eval.robot_metrics`.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic_io import atomic_write
from .replay import EvalUsageError

ROBOT_SOURCES = ("lerobot",)
RESULTS_FILE = "results.jsonl"
REPORT_DIR = "report"
STATE_KEY, ACTION_KEY = "observation.state", "action"
# The dataset features that fill the state dims derived from the simulator's state (vla.robot_state's sources).
SOURCE_KEYS = {"environment_state": "observation.environment_state", "ee_pose": "observation.ee_pose"}


class RobotDimsError(EvalUsageError):
    """The dataset's state or action columns do not map onto the planner's schema; the message names the feature."""


# Other names datasets give a schema dim: the SO-101 simulator's own action calls the gripper command ``grasp``.
DIM_ALIASES = {"grasp": "gripper"}


def _normalise(name: str) -> str:
    name = name[:-len(".pos")] if name.endswith(".pos") else name
    return DIM_ALIASES.get(name, name)


def feature_names(feature: dict[str, Any]) -> list[str] | None:
    """A LeRobot feature's per-dim names (a list, or LeRobot's ``{"motors": [...]}`` form), or None."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return [_normalise(n) for n in names]
    return None


def map_dims(info: dict[str, Any], key: str, wanted: Sequence[str], *, where: str) -> npt.NDArray[np.int64] | None:
    """Column indices of ``info``'s feature ``key`` in the order of ``wanted`` (None: ``wanted`` is empty, keep all);
    raises :class:`RobotDimsError` naming the feature when they disagree."""
    if not wanted:
        return None
    feature = info["features"][key]
    size = int(np.prod(feature.get("shape") or [0]))
    names = feature_names(feature)
    if names is not None and set(wanted) <= set(names):
        return np.asarray([names.index(w) for w in wanted], dtype=np.int64)
    if names is None and size == len(wanted):
        return np.arange(size, dtype=np.int64)
    raise RobotDimsError(f"{where}: dataset feature {key!r} has {size} dim(s) {names or '(unnamed)'}; the schema "
                         f"wants {len(wanted)}: {', '.join(wanted)}")


def state_mapping(info: dict[str, Any], state_dims: Sequence[str], *,
                  where: str) -> tuple[tuple[str, ...], list[str], npt.NDArray[np.int64] | None]:
    """How a sample's state is composed: (the schema's dims, its joint dims, their ``observation.state`` columns).
    Raises :class:`RobotDimsError` naming the feature the dataset lacks for a derived dim."""
    from ..vla.robot_state import JOINTS, dim_sources, joint_dims

    joints = joint_dims(state_dims)
    lacking = [SOURCE_KEYS[s] for s in sorted(dim_sources(state_dims) - {JOINTS})
               if SOURCE_KEYS[s] not in info["features"]]
    if lacking:
        raise RobotDimsError(f"{where}: the schema's state ({', '.join(state_dims)}) needs dataset feature(s) "
                             f"{', '.join(map(repr, lacking))}, which the dataset does not have")
    return tuple(state_dims), joints, map_dims(info, STATE_KEY, joints, where=where) if joints else None


def sample_state(sample: Any, state_dims: Sequence[str], joint_names: Sequence[str],
                 state_map: npt.NDArray[np.int64] | None) -> npt.NDArray[np.float64]:
    """A replayed sample's state in the schema's ``state_dims`` (every ``observation.state`` column when it names
    none)."""
    from ..vla.robot_state import compose_state

    if not state_dims:
        return np.asarray(sample.state, dtype=np.float64)
    joints = {} if state_map is None else dict(zip(joint_names, sample.state[state_map].tolist(), strict=True))
    return compose_state(state_dims, joints, environment_state=sample.environment_state, ee_pose=sample.ee_pose,
                         where=f"episode {sample.episode_index} frame {sample.frame_index}")


def gripper_threshold(root: Path, info: dict[str, Any], action_map: npt.NDArray[np.int64],
                      dims: Sequence[str]) -> float | None:
    """The open/closed threshold of the schema's ``gripper`` dim: the midpoint of that action column's min and max
    in the dataset's ``meta/stats.json`` (LeRobot's own statistics), else 0.5. None: the schema has no gripper."""
    if "gripper" not in dims:
        return None
    column = int(action_map[list(dims).index("gripper")])
    try:
        stats = json.loads((root / "meta" / "stats.json").read_text(encoding="utf-8"))[ACTION_KEY]
        return float((float(stats["min"][column]) + float(stats["max"][column])) / 2)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0.5


def _failure(record: dict[str, Any], exc: Exception) -> dict[str, Any]:
    record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    return record


def plan_answer(planner: Any, observation: Any) -> dict[str, Any]:
    """What planning ``observation`` adds to its sample's record: the stage times and the predicted chunk, a parse
    error, or the failure (refused observation, prompt too long, full cache). Runs where the planner is: in this
    process, or on a Ray worker (:meth:`~.ray_worker.PlannerWorker.robot_replay`)."""
    from ..runtime.backend import BackendError

    try:
        plan = planner.plan_robot(observation)
    except BackendError as exc:
        return _failure({}, exc)
    answer: dict[str, Any] = {"stats": {"stage_ms": {k: round(float(v), 3) for k, v in plan.stats.stage_ms.items()}}}
    if plan.plan is None:
        answer.update(status="parse_error", error=str(plan.error))
    else:
        answer["pred"] = np.asarray(plan.plan.actions, dtype=np.float64).tolist()
    return answer


PlanMapper = Callable[[Iterable[Any]], Iterator[dict[str, Any]]]


def replay_robot(planner: Any, source: Any, *, limit: int | None = None,
                 map_plans: PlanMapper | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Plan every sample of ``source`` (a :class:`~blockpilot.sim.robot.lerobot_io.LeRobotReplaySource`) with
    ``planner`` (its ``schema`` at least); returns the per-sample records, in the dataset's order, and the mapping
    facts (dims, gripper threshold). ``map_plans`` plans the observations elsewhere (on Ray workers, yielding
    :func:`plan_answer`'s answers in the order given); the samples are read, and the records made, here."""
    from ..runtime.backend import BackendError
    from ..runtime.plan_types import RobotObservation
    from ..sim.robot.types import RobotDataError
    from ..vla.robot_state import StateSourceError

    schema = planner.schema
    where = str(source.root / "meta" / "info.json")
    state_dims, joint_names, state_map = state_mapping(source.info, getattr(schema, "state_dims", ()), where=where)
    action_map = map_dims(source.info, ACTION_KEY, schema.dims, where=where)
    assert action_map is not None  # an action-chunk schema has dims
    threshold = gripper_threshold(source.root, source.info, action_map, schema.dims)
    previous: dict[int, list[float]] = {}  # episode -> its last action seen (frames come in order)
    total = len(source) if limit is None else min(limit, len(source))
    queue: deque[tuple[dict[str, Any], bool]] = deque()  # records in order; True: waiting for its plan

    def observations() -> Iterator[Any]:
        for index in range(total):
            record: dict[str, Any] = {"index": index, "status": "ok", "error": None}
            try:
                sample = source[index]
            except (RobotDataError, OSError, ValueError, KeyError) as exc:
                queue.append((_failure(record, exc), False))
                continue
            episode, frame = sample.episode_index, sample.frame_index
            target = sample.actions[:, action_map].astype(np.float64)
            record.update(episode=episode, frame=frame, target=target.tolist(), pad=sample.action_pad.tolist(),
                          baseline=None, pred=None)
            last = previous.get(episode) if frame > 0 else None
            if last is not None:
                record["baseline"] = [last] * len(target)
            previous[episode] = target[0].tolist()
            try:
                state = sample_state(sample, state_dims, joint_names, state_map)
                observation = RobotObservation(images=[sample.images[c] for c in source.cameras],
                                               instruction=sample.instruction, state=state)
            except (BackendError, StateSourceError) as exc:  # a refused observation: recorded, and the replay goes on
                queue.append((_failure(record, exc), False))
                continue
            queue.append((record, True))
            yield observation

    records: list[dict[str, Any]] = []
    answers = map_plans(observations()) if map_plans else (plan_answer(planner, o) for o in observations())
    for answer in answers:
        while not queue[0][1]:
            records.append(queue.popleft()[0])
        record = queue.popleft()[0]
        record.update(answer)
        records.append(record)
    records.extend(record for record, _ in queue)
    facts = {"dims": list(schema.dims), "steps": int(schema.steps), "action": schema.action,
             "state_columns": None if state_map is None else state_map.tolist(),
             "action_columns": action_map.tolist(), "gripper_threshold": threshold}
    return records, facts


def check_robot_schema(schema: Any, flag: str) -> None:
    from ..vla.plans import ActionChunkSchema

    if not isinstance(schema, ActionChunkSchema):
        raise EvalUsageError(f"{flag}: --source lerobot replays plan action chunks and need an action-chunk schema "
                             f"(--schema so101-joints or ee-delta), got {type(schema).__name__}")


def write_robot_run(out: Path, records: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> Path:
    """``out/results.jsonl``, ``out/report/metrics.json``, ``out/report/summary.md`` and ``out/report/plots/``;
    returns the report dir."""
    from .robot_metrics import summary_markdown
    from .robot_plots import write_robot_plots

    report = out / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(report / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    plots = write_robot_plots(records, metrics, report / "plots")
    atomic_write(report / "summary.md", summary_markdown(metrics, [p.name for p in plots]))
    return report


def open_robot_source(dataroot: str | Path, chunk: int = 8, episodes: Sequence[int] | None = None,
                      cameras: Sequence[str] | None = None) -> Any:
    """The LeRobot dataset at ``dataroot`` (only ``episodes`` when given; ``cameras``, in prompt order, default all
    it records) as a replay source (its target chunks ``chunk`` actions long)."""
    from ..sim.robot.lerobot_io import LeRobotReplaySource

    return LeRobotReplaySource(dataroot, chunk=chunk, episodes=episodes, cameras=cameras)


def run_robot(planner: Any, source: Any, out: Path, *, limit: int | None = None, quiet: bool = False,
              map_plans: PlanMapper | None = None) -> int:
    """Replay, score and write the run (``map_plans``: planned on Ray workers); 1 when no sample could be planned,
    else 0."""
    import sys

    from .robot_metrics import headline, robot_metrics

    check_robot_schema(planner.schema, "--schema")
    if source.chunk != planner.schema.steps:
        source = open_robot_source(source.root, chunk=planner.schema.steps, cameras=source.cameras)
    records, facts = replay_robot(planner, source, limit=limit, map_plans=map_plans)
    metrics = robot_metrics(records, facts)
    report = write_robot_run(out, records, metrics)
    counts = metrics["counts"]
    if not quiet:
        print(headline(metrics))
        print(f"results: {out / RESULTS_FILE}\nreport:  {report / 'summary.md'}")
    if counts["failed"]:
        first = counts["failures"][0]
        print(f"blockpilot eval: {counts['failed']} of {counts['total']} samples failed; first: sample "
              f"{first['index']}: {first['error']}", file=sys.stderr)
    if counts["total"] and not counts["ok"] + counts["parse_error"]:
        print(f"blockpilot eval: error: no sample of {counts['total']} could be planned on", file=sys.stderr)
        return 1
    return 0
