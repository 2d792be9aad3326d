"""Held-out evaluation on generated scenes: the planner against constant-velocity extrapolation.

Scenes come from seeds at or above :data:`HELDOUT_SEED_BASE`, which training never uses. L2 is
reported both ways the literature does: at 3 s ("at t", UniAD) and averaged over the 1, 2 and 3 s
points ("average up to t", ST-P3 / VAD); averages run over samples whose plan parsed, and the CV
baseline over the same samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from ..runtime.plan_types import Observation
from ..runtime.planner import Planner
from ..sim.generator import generate_scene
from ..sim.samples import FUTURE_TIMES_S, Keyframe, keyframe_constant_velocity, keyframes
from ..vla.prompt import EgoState

HELDOUT_SEED_BASE = 1_000_000
_AT_1_2_3_S = [FUTURE_TIMES_S.index(t) for t in (1.0, 2.0, 3.0)]


@dataclass(frozen=True, slots=True)
class HeldoutReport:
    decoder: str
    samples: int
    parsed: int
    l2_3s_model: float
    l2_3s_cv: float
    l2_avg_model: float
    l2_avg_cv: float
    forwards_per_plan: float
    tokens_per_forward: float
    ms_per_plan: float

    @property
    def parse_rate(self) -> float:
        return self.parsed / max(self.samples, 1)

    @property
    def improvement_3s(self) -> float:
        """Relative L2@3s reduction against constant velocity (0.3 = 30% better)."""
        return 1.0 - self.l2_3s_model / self.l2_3s_cv if self.l2_3s_cv > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "parse_rate": self.parse_rate, "improvement_3s": self.improvement_3s}


def heldout_keyframes(num_scenes: int, stride: int = 4, first_seed: int = HELDOUT_SEED_BASE) -> list[Keyframe]:
    """Every ``stride``-th keyframe with a full 3 s future from ``num_scenes`` held-out scenes."""
    out: list[Keyframe] = []
    for seed in range(first_seed, first_seed + num_scenes):
        out += [k for k in keyframes(generate_scene(seed))[::stride] if k.future_valid]
    return out


def observation(keyframe: Keyframe) -> Observation:
    ego = EgoState(past_waypoints=keyframe.past_xy, speed_mps=float(keyframe.speed), accel_mps2=float(keyframe.accel))
    return Observation(images=list(keyframe.images().values()), ego=ego, route_command=keyframe.route_command)


def evaluate(planner: Planner, samples: Iterable[Keyframe]) -> HeldoutReport:
    errors_model: list[np.ndarray] = []
    errors_cv: list[np.ndarray] = []
    forwards: list[int] = []
    tokens_per_forward: list[float] = []
    ms: list[float] = []
    total = 0
    for keyframe in samples:
        total += 1
        plan = planner.plan(observation(keyframe))
        forwards.append(plan.stats.forwards)
        tokens_per_forward.append(plan.stats.tokens_per_forward)
        ms.append(plan.stats.stage_ms["total"])
        if plan.waypoints is None:
            continue
        truth = keyframe.future_xy
        errors_model.append(np.linalg.norm(plan.waypoints - truth, axis=1))
        errors_cv.append(np.linalg.norm(keyframe_constant_velocity(keyframe) - truth, axis=1))
    model = np.array(errors_model).reshape(-1, len(FUTURE_TIMES_S))
    cv = np.array(errors_cv).reshape(-1, len(FUTURE_TIMES_S))

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return HeldoutReport(
        decoder=planner.settings.name, samples=total, parsed=len(errors_model),
        l2_3s_model=mean(model[:, -1]), l2_3s_cv=mean(cv[:, -1]),
        l2_avg_model=mean(model[:, _AT_1_2_3_S]), l2_avg_cv=mean(cv[:, _AT_1_2_3_S]),
        forwards_per_plan=float(np.mean(forwards)) if forwards else 0.0,
        tokens_per_forward=float(np.mean(tokens_per_forward)) if tokens_per_forward else 0.0,
        ms_per_plan=float(np.median(ms)) if ms else 0.0,
    )
