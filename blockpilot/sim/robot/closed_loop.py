"""Closed-loop episodes in the SO-101 simulator: a policy answers action chunks, the environment runs them.

Each step the runner asks the policy for a chunk (``(rows, 4)``: ``dx, dy, dz, grasp`` in the environment's own
action units, :mod:`.types`), runs its rows one per control step (10 Hz), each clipped to the action space first
(counted), and asks again when they are used up, until the task's success check, the environment's own end (the
block pushed out of the workspace) or the step limit. The policy sees what the recorded demonstrations hold
(:func:`~.so101.run_expert_episode`): the episode's camera frames at the configured size, the six joint positions
(gripper included) as ``state``, the task's instruction, and the simulator's ``environment_state`` (the block
position) and ``ee_pose`` as the recorded dataset's ``observation.environment_state`` and ``observation.ee_pose``
(privileged state a model's schema may name: :mod:`blockpilot.vla.robot_state`) (:class:`SimObservation`,
shaped like the runtime's ``RobotObservation``; ``sim`` may not import the runtime, so
:mod:`blockpilot.eval.robot_closed_loop` wraps a planner as a policy). Seeds: training data comes from seeds
below :data:`HELD_OUT_START`, evaluation from it on.

Baselines: :class:`ExpertPolicy` (the task's scripted expert, one action per step: the upper bound; through this
runner it takes exactly the actions of :func:`~.so101.run_expert_episode`) and :class:`HoldPolicy` (no motion,
the gripper command kept as it is: the closed-loop analogue of repeat-last-action, since the first action of an
episode has no predecessor and repeating its own previous answer never moves).

Collisions count the starts of contact between an arm link and the table (one per touch, however long it lasts)
plus one when the block is knocked out of the workspace (the environment ends the episode without success).
Deterministic for a seed: the seed places the block (and goal), physics and IK are deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .so101 import ACTION_NAMES, ExpertConfig, SimSession
from .types import RobotDataError

ACTION_DIMS = len(ACTION_NAMES)
HELD_OUT_START = 1_000_000  # seeds 0 .. 999_999 are for training data; held-out evaluation starts here
STRIP_FRAMES = 6  # frames kept per episode (evenly spaced) when asked, for a report's strip


class PolicyError(RobotDataError):
    """A policy answered something the environment cannot run (wrong shape, non-finite value); names the policy."""


@dataclass(frozen=True)
class SimObservation:
    """What a policy is given each time it is asked: ``images`` (one ``(H, W, 3)`` uint8 frame per configured
    camera, empty for a policy that declares ``needs_images = False``), the task's ``instruction`` and ``state``
    (the six joint positions, radians, gripper last); the first four fields are a runtime ``RobotObservation``.
    ``environment_state`` (the block position, then the goal's where the task has one) and ``ee_pose`` (the
    gripper point, then its orientation quaternion w, x, y, z) are the simulator's own, as the dataset records
    them."""

    images: list[npt.NDArray[np.uint8]]
    instruction: str
    state: npt.NDArray[np.float64]
    gripper: float | None = None
    environment_state: npt.NDArray[np.float64] | None = None
    ee_pose: npt.NDArray[np.float64] | None = None


class ChunkPolicy(Protocol):
    """A closed-loop policy. ``act`` returns the rows to run before it is asked again, ``(rows, 4)`` float, in the
    environment's action units. A policy may also define ``needs_images`` (default True) and ``attach(sim)``
    (called after ``reset`` with the episode's :class:`~.so101.SimSession`: the scripted baselines read the
    simulator; a learned policy must not)."""

    name: str

    def reset(self, seed: int) -> None: ...

    def act(self, observation: SimObservation) -> npt.NDArray[np.float64]: ...


@runtime_checkable
class _Attachable(Protocol):
    def attach(self, sim: SimSession) -> None: ...


class _SimPolicy:
    """A baseline that reads the simulator (bound per episode by :meth:`attach`)."""

    name = "sim"
    needs_images = False

    def __init__(self) -> None:
        self._sim: SimSession | None = None

    def reset(self, seed: int) -> None:
        self._sim = None

    def attach(self, sim: SimSession) -> None:
        self._sim = sim

    @property
    def sim(self) -> SimSession:
        if self._sim is None:
            raise PolicyError(f"policy {self.name}: act before the episode attached its simulator")
        return self._sim


class ExpertPolicy(_SimPolicy):
    """The task's scripted expert (the package's controller), one action per call: the upper bound."""

    name = "expert"

    def act(self, observation: SimObservation) -> npt.NDArray[np.float64]:
        return self.sim.expert_action()[None, :].astype(np.float64)


class HoldPolicy(_SimPolicy):
    """No motion; the gripper command stays what the actuator holds (repeat-last-action in closed loop)."""

    name = "hold"

    def act(self, observation: SimObservation) -> npt.NDArray[np.float64]:
        return np.array([[0.0, 0.0, 0.0, self.sim.gripper_command()]], dtype=np.float64)


@dataclass
class ClosedLoopEpisode:
    """One episode's outcome. ``steps`` actions ran; ``time_to_success_s`` is ``steps / fps`` when it succeeded.
    ``clipped_actions`` counts rows clipped to the action space (``dx, dy, dz`` in [-1, 1], grasp in [0, 1]) before
    they ran. ``plan_ms``/``forwards`` hold one entry per time the policy was asked (``forwards`` only from a planner);
    ``error`` is why the episode stopped early (the policy raised), which counts as a failure."""

    seed: int
    policy: str
    task: str
    success: bool
    steps: int
    fps: int
    collisions: int
    arm_contacts: int
    knocked_off: bool
    final_distance_m: float
    clipped_actions: int = 0
    plan_ms: list[float] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    error: str | None = None
    frames: npt.NDArray[np.uint8] | None = None  # (STRIP_FRAMES, H, W, 3) when asked, else None
    actions: npt.NDArray[np.float32] | None = None  # (steps, 4): what ran

    @property
    def time_to_success_s(self) -> float | None:
        return round(self.steps / self.fps, 4) if self.success else None

    def to_record(self) -> dict[str, Any]:
        """The JSON record (no frames)."""
        return {"seed": self.seed, "policy": self.policy, "task": self.task,
                "status": "ok" if self.error is None else "failed", "success": self.success, "steps": self.steps,
                "time_to_success_s": self.time_to_success_s, "collisions": self.collisions,
                "arm_contacts": self.arm_contacts, "knocked_off": self.knocked_off,
                "final_distance_m": round(self.final_distance_m, 5), "clipped_actions": self.clipped_actions,
                "plan_ms": [round(v, 3) for v in self.plan_ms], "forwards": list(self.forwards), "error": self.error}


def check_chunk(chunk: Any, policy: str) -> npt.NDArray[np.float64]:
    """``chunk`` as a ``(rows >= 1, 4)`` finite float array, else :class:`PolicyError` naming ``policy``."""
    try:
        rows = np.asarray(chunk, dtype=np.float64)
    except (TypeError, ValueError):
        raise PolicyError(f"policy {policy}: answered {type(chunk).__name__}, not an array of actions") from None
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] != ACTION_DIMS:
        raise PolicyError(f"policy {policy}: answered shape {rows.shape}; the environment runs (rows, "
                          f"{ACTION_DIMS}) actions: {', '.join(ACTION_NAMES)}")
    if not np.isfinite(rows).all():
        raise PolicyError(f"policy {policy}: answered a non-finite action")
    return rows


def _observe(sim: SimSession, images: bool) -> SimObservation:
    frames = list(sim.frames().values()) if images else []
    return SimObservation(images=frames, instruction=sim.instruction, state=sim.joint_state().astype(np.float64),
                          environment_state=sim.environment_state().astype(np.float64),
                          ee_pose=sim.ee_pose().astype(np.float64))


def run_closed_loop_episode(seed: int, policy: ChunkPolicy, config: ExpertConfig | None = None, *,
                            keep_frames: bool = False,
                            errors: tuple[type[BaseException], ...] = (ValueError,),
                            sim: SimSession | None = None,
                            on_step: Callable[[SimSession], object] | None = None) -> ClosedLoopEpisode:
    """Run ``policy`` from ``seed`` in the task of ``config`` (its cameras, image size and step limit).

    An exception of a type in ``errors`` raised by the policy (and any :class:`PolicyError`) ends the episode as a
    failure with its message; anything else propagates. ``keep_frames``: keep :data:`STRIP_FRAMES` evenly spaced
    frames of the first camera (rendered after the fact only where the policy did not need images). ``sim``: a
    session of ``config`` (its step limit aside) to :meth:`~.so101.SimSession.reset` to ``seed`` instead of
    building one (the caller closes it). ``on_step(sim)`` is called before each action runs (the DAgger recorder
    reads the state there)."""
    config = config or ExpertConfig()
    if sim is not None and replace(sim.config, max_steps=None) != replace(config, max_steps=None):
        raise RobotDataError(f"the given simulator session runs {sim.config}, not {config}")
    policy.reset(seed)
    if sim is not None:
        sim.reset(seed)
        return _run(seed, policy, config, sim, keep_frames, errors, on_step)
    with SimSession(config, seed) as own:
        return _run(seed, policy, config, own, keep_frames, errors, on_step)


def _run(seed: int, policy: ChunkPolicy, config: ExpertConfig, sim: SimSession, keep_frames: bool,
         errors: tuple[type[BaseException], ...], on_step: Callable[[SimSession], object] | None) -> ClosedLoopEpisode:
    images = bool(getattr(policy, "needs_images", True))
    caught: tuple[type[BaseException], ...] = (PolicyError, *errors)
    if isinstance(policy, _Attachable):
        policy.attach(sim)
    limit = config.max_steps or config.spec.max_steps  # config's, which may differ from the session's
    keep = set(np.linspace(0, limit - 1, STRIP_FRAMES).round().astype(int).tolist()) if keep_frames else set()
    kept: list[npt.NDArray[np.uint8]] = []
    queue: list[npt.NDArray[np.float64]] = []
    ran: list[npt.NDArray[np.float32]] = []
    plan_ms: list[float] = []
    forwards: list[int] = []
    success = touching = knocked = False
    steps = contacts = clipped = 0
    low, high = (np.asarray(b, dtype=np.float64) for b in (sim.env.action_space.low, sim.env.action_space.high))
    error: str | None = None
    while steps < limit:
        if steps in keep:
            kept.append(sim.camera.frame(sim.env.data, config.cameras[0]))
        if not queue:
            observation = _observe(sim, images)
            started = time.perf_counter()
            try:
                rows = check_chunk(policy.act(observation), policy.name)
            except caught as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            measured = getattr(policy, "last_stats", None)
            plan_ms.append(measured[0] if measured else (time.perf_counter() - started) * 1e3)
            if measured:
                forwards.append(measured[1])
            queue = list(rows)
        if on_step is not None:
            on_step(sim)
        wanted = queue.pop(0)
        row = np.clip(wanted, low, high)
        clipped += bool((row != wanted).any())
        ran.append(row.astype(np.float32))
        success, ended = sim.step(ran[-1])
        steps += 1
        now = sim.arm_touches_floor()
        contacts += now and not touching
        touching = now
        if success or ended:
            knocked = ended and not success
            break
    frames = None
    if keep_frames:
        while len(kept) < STRIP_FRAMES:  # ended early: the last frame fills the strip
            kept.append(sim.camera.frame(sim.env.data, config.cameras[0]))
        frames = np.stack(kept[:STRIP_FRAMES])
    return ClosedLoopEpisode(
        seed=seed, policy=policy.name, task=config.task, success=bool(success), steps=steps, fps=sim.fps,
        collisions=int(contacts) + int(knocked), arm_contacts=int(contacts), knocked_off=bool(knocked),
        clipped_actions=int(clipped),
        final_distance_m=sim.block_distance(), plan_ms=plan_ms, forwards=forwards, error=error, frames=frames,
        actions=np.asarray(ran, dtype=np.float32).reshape(-1, ACTION_DIMS))
