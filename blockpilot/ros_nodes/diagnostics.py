"""The planner node's bookkeeping: its ``diagnostic_msgs/DiagnosticArray`` and the frame slot.

Every camera frame the node receives ends in exactly one *outcome* (:data:`OUTCOME_LEVELS`): it
is planned and published, dropped because a newer frame arrived while a plan was in flight,
ignored while the node is inactive, or refused with a reason. So at any instant
``frames_received == sum(frames_<outcome>) + frames_waiting + frames_in_flight``; the array
carries all of these counters, the latest plan's latency per stage, and the level and message of
the latest outcome (OK, WARN or ERROR). :class:`FrameSlot`, the one-slot mailbox between the
camera callbacks and the planning thread, keeps the waiting, in-flight and dropped counts.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

T = TypeVar("T")
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}

# Outcome of a frame -> the level it reports. Input problems the robot may recover from by itself
# (odometry or joint states late or not yet there, a plan too slow or unparsable) warn; broken data errs
# (a joint the model needs missing from the joint state among them).
OUTCOME_LEVELS: dict[str, bytes] = {
    "planned": OK,
    "dropped_busy": OK,
    "duplicate": OK,
    "inactive": OK,
    "no_odometry": WARN,
    "stale_odometry": WARN,
    "short_history": WARN,
    "parse_failure": WARN,
    "deadline_miss": WARN,
    "no_instruction": WARN,
    "no_joint_state": WARN,
    "stale_joint_state": WARN,
    "stale_camera": WARN,
    "nonfinite_odometry": ERROR,
    "missing_joint": ERROR,
    "malformed_joint_state": ERROR,
    "nonfinite_joint_state": ERROR,
    "malformed_image": ERROR,
    "bad_observation": ERROR,
    "planner_error": ERROR,
    "internal_error": ERROR,
}
STALE_OUTCOMES = ("no_odometry", "stale_odometry", "short_history", "nonfinite_odometry", "no_joint_state",
                  "stale_joint_state", "stale_camera")
LATENCY_WINDOW = 100


@dataclass
class _State:
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOME_LEVELS, 0))
    received: int = 0
    waiting: int = 0
    in_flight: int = 0
    odometry_received: int = 0
    odometry_refused: int = 0
    route_received: int = 0
    route_refused: int = 0
    inputs: dict[str, list[int]] = field(default_factory=dict)  # input name -> [received, refused]
    level: bytes = OK
    message: str = "waiting for camera frames"
    last_stamp_ns: int | None = None
    last_stage_ms: dict[str, float] = field(default_factory=dict)
    last_latency_ms: float | None = None
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class PlannerDiagnostics:
    """Thread-safe counters of the planner node (the executor and the planning thread both report)."""

    def __init__(self, name: str, hardware_id: str, details: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.hardware_id = hardware_id
        self.details = dict(details or {})
        self._lock = threading.Lock()
        self._s = _State()

    def set_detail(self, key: str, value: str) -> None:
        """A fixed key/value the status carries (lifecycle state, backend, decoder)."""
        with self._lock:
            self.details[key] = value

    def received(self) -> None:
        with self._lock:
            self._s.received += 1

    def waiting(self, delta: int) -> None:
        """A frame entered (+1) or left (-1) the one-slot mailbox."""
        with self._lock:
            self._s.waiting += delta

    def in_flight(self, delta: int) -> None:
        with self._lock:
            self._s.in_flight += delta

    def outcome(self, kind: str, message: str = "", *, stamp_ns: int | None = None,
                stage_ms: Mapping[str, float] | None = None, latency_ms: float | None = None) -> None:
        """Account one frame. Dropped, duplicate and inactive frames only count; the others also set the
        status level and message."""
        if kind not in OUTCOME_LEVELS:
            raise ValueError(f"unknown outcome {kind!r}; expected one of {tuple(OUTCOME_LEVELS)}")
        with self._lock:
            s = self._s
            s.outcomes[kind] += 1
            if kind in ("dropped_busy", "duplicate"):
                return
            s.level = OUTCOME_LEVELS[kind]
            s.message = message or kind.replace("_", " ")
            if stamp_ns is not None:
                s.last_stamp_ns = stamp_ns
            if stage_ms is not None:
                s.last_stage_ms = dict(stage_ms)
            if latency_ms is not None:
                s.last_latency_ms = latency_ms
                s.latencies_ms.append(latency_ms)

    def odometry(self, ok: bool) -> None:
        with self._lock:
            self._s.odometry_received += 1
            self._s.odometry_refused += not ok

    def route(self, ok: bool, message: str = "") -> None:
        with self._lock:
            self._s.route_received += 1
            if not ok:
                self._s.route_refused += 1
                self._s.level, self._s.message = WARN, message or "route command refused"

    def input(self, name: str, ok: bool, message: str = "") -> None:
        """Count one message of another input (``<name>_received``, ``<name>_refused``); a refusal warns."""
        with self._lock:
            counts = self._s.inputs.setdefault(name, [0, 0])
            counts[0] += 1
            if not ok:
                counts[1] += 1
                self._s.level, self._s.message = WARN, message or f"{name} refused"

    def counts(self) -> dict[str, int]:
        """``frames_received``, ``frames_<outcome>``, ``frames_waiting``, ``frames_in_flight`` and the
        odometry and route counters."""
        with self._lock:
            s = self._s
            out = {"frames_received": s.received, **{f"frames_{k}": v for k, v in s.outcomes.items()},
                   "frames_waiting": s.waiting, "frames_in_flight": s.in_flight,
                   "odometry_received": s.odometry_received, "odometry_refused": s.odometry_refused,
                   "route_received": s.route_received, "route_refused": s.route_refused}
            for name, (received, refused) in s.inputs.items():
                out[f"{name}_received"], out[f"{name}_refused"] = received, refused
        return out

    def values(self) -> dict[str, str]:
        """Every key/value the status carries, as strings."""
        counts = self.counts()
        with self._lock:
            s = self._s
            latencies = sorted(s.latencies_ms)
            stage = dict(s.last_stage_ms)
            last_latency, last_stamp = s.last_latency_ms, s.last_stamp_ns
            details = dict(self.details)
        diagnosed = sum(counts[f"frames_{k}"] for k in OUTCOME_LEVELS if k not in ("planned", "dropped_busy"))
        out = {**details, **{k: str(v) for k, v in counts.items()},
               "frames_diagnosed": str(diagnosed),
               "deadline_misses": str(counts["frames_deadline_miss"]),
               "stale_inputs": str(sum(counts[f"frames_{k}"] for k in STALE_OUTCOMES)),
               "parse_failures": str(counts["frames_parse_failure"]),
               "malformed_images": str(counts["frames_malformed_image"])}
        if last_stamp is not None:
            out["last_frame_stamp_ns"] = str(last_stamp)
        if last_latency is not None:
            out["latency_ms_last"] = f"{last_latency:.2f}"
            out["latency_ms_median"] = f"{latencies[len(latencies) // 2]:.2f}"
            out["latency_ms_max"] = f"{latencies[-1]:.2f}"
        out.update({f"stage_ms.{k}": f"{v:.2f}" for k, v in stage.items()})
        return out

    def status(self) -> tuple[bytes, str]:
        with self._lock:
            return self._s.level, self._s.message

    def array(self, stamp: Any) -> DiagnosticArray:
        """One ``DiagnosticStatus`` named after the node, its hardware id the planner backend."""
        level, message = self.status()
        status = DiagnosticStatus(level=level, name=self.name, message=message, hardware_id=self.hardware_id,
                                  values=[KeyValue(key=k, value=v) for k, v in self.values().items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = stamp
        return array


class FrameSlot(Generic[T]):
    """The newest camera frame waiting for the planning thread, behind the node's active gate.

    :meth:`offer` (executor thread) counts every frame: ignored while inactive, a duplicate of the
    previous stamp (the raw and the compressed topic of one camera), or put in the slot, replacing
    (and counting as ``dropped_busy``) a frame that was still waiting. :meth:`take` (planning thread)
    blocks for the next frame and marks it in flight until :meth:`done`.
    """

    def __init__(self, diagnostics: PlannerDiagnostics) -> None:
        self.diagnostics = diagnostics
        self._cv = threading.Condition()
        self._item: T | None = None
        self._last_stamp: int | None = None
        self._active = False
        self._closed = False

    @property
    def active(self) -> bool:
        with self._cv:
            return self._active

    def set_active(self, active: bool, reason: str = "deactivated before planning") -> None:
        with self._cv:
            self._active = active
            if not active:
                self._drop(reason)

    def close(self, reason: str = "shut down before planning") -> None:
        """Refuse further frames and release :meth:`take` with ``None``."""
        with self._cv:
            self._active, self._closed = False, True
            self._drop(reason)
            self._cv.notify_all()

    def _drop(self, reason: str) -> None:
        if self._item is not None:
            self._item = None
            self.diagnostics.waiting(-1)
            self.diagnostics.outcome("inactive", reason)

    def offer(self, item: T, stamp_ns: int) -> None:
        d = self.diagnostics
        d.received()
        with self._cv:
            if not self._active:
                d.outcome("inactive", "inactive: camera frame ignored", stamp_ns=stamp_ns)
                return
            if stamp_ns == self._last_stamp:
                d.outcome("duplicate")
                return
            self._last_stamp = stamp_ns
            if self._item is not None:
                d.outcome("dropped_busy")
            else:
                d.waiting(+1)
            self._item = item
            self._cv.notify()

    def take(self) -> T | None:
        """The next frame (now in flight), or ``None`` once closed."""
        with self._cv:
            while self._item is None and not self._closed:
                self._cv.wait()
            item, self._item = self._item, None
            if self._closed or item is None:
                return None
            self.diagnostics.waiting(-1)
            self.diagnostics.in_flight(+1)
            return item

    def done(self) -> None:
        """The frame from :meth:`take` has its outcome."""
        self.diagnostics.in_flight(-1)


def status_values(status: Any) -> dict[str, str]:
    """The key/values of a ``DiagnosticStatus`` as a dict (for tests and monitors)."""
    return {kv.key: kv.value for kv in status.values}
