"""Bench2Drive / CARLA leaderboard scores on a closed-loop episode (:class:`~blockpilot.sim.drive.episode.DriveLog`).

Sources: the CARLA Autonomous Driving Leaderboard's evaluation (leaderboard.carla.org/#evaluation-and-metrics, 2.0)
and Bench2Drive (Jia et al., "Bench2Drive: Towards Multi-Ability Benchmarking of Closed-Loop End-To-End Autonomous
Driving", NeurIPS 2024 Datasets and Benchmarks), which scores each route with the leaderboard's rules:

- **Route completion** (RC): the fraction of the route driven; route progress made while outside the route's lanes
  (off the drivable area, or in a lane of oncoming traffic: the leaderboard's "outside route lanes" test) does not
  count. The route here runs from where the policy took over to where the expert was ``route_grace_s`` before the
  end (:class:`~blockpilot.sim.drive.episode.DriveConfig`).
- **Infraction penalty**: the product of the leaderboard's coefficients, one factor per infraction: collision with a
  pedestrian 0.50, with a vehicle (cyclists are vehicles in CARLA) 0.60, with a static element 0.65, running a stop
  sign 0.80. The world has no traffic lights, scenario timeouts, emergency vehicles or minimum-speed scenarios, so
  red light (0.70), timeout (0.70), yield to emergency vehicle (0.70) and minimum speed are not scored. CARLA counts
  every collision, whoever is at fault; each new contact with an agent is one.
- **Driving score** = RC * penalty; **success** = the route completed with no infraction (Bench2Drive's success
  rate); **infractions per km** over the distance driven.

A stop sign is run when the ego's front crosses the stop line after the take-over without having been below
0.1 m/s (CARLA's ``RunningStopTest`` speed threshold) within 6 m before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..sim.drive.episode import DriveLog
from ..sim.drive.lanes import in_oncoming_lane, on_drivable, route_frenet
from .closed_loop_metrics import collisions, route_progress

PENALTIES = {"collision_pedestrian": 0.50, "collision_vehicle": 0.60, "collision_static": 0.65, "stop_sign": 0.80}
STOP_SPEED = 0.1  # m/s
STOP_ZONE_M = 6.0
COMPLETE = 1.0 - 1e-9


@dataclass(frozen=True)
class DrivingScores:
    route_completion: float
    infractions: dict[str, int] = field(default_factory=dict)
    driven_km: float = 0.0

    @property
    def penalty(self) -> float:
        return float(np.prod([PENALTIES[k] ** n for k, n in self.infractions.items()]))

    @property
    def driving_score(self) -> float:
        return self.route_completion * self.penalty

    @property
    def success(self) -> bool:
        return self.route_completion >= COMPLETE and not any(self.infractions.values())

    @property
    def infractions_per_km(self) -> float | None:
        n = sum(self.infractions.values())
        return n / self.driven_km if self.driven_km > 0 else (0.0 if n == 0 else None)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "penalty": self.penalty, "driving_score": self.driving_score,
                "success": self.success, "infractions_per_km": self.infractions_per_km}


def _collision_key(kind: str) -> str:
    return {"pedestrian": "collision_pedestrian", "static": "collision_static"}.get(kind, "collision_vehicle")


def stop_sign_infractions(log: DriveLog) -> int:
    """1 when the ego's front crossed the stop line after the take-over without stopping before it, else 0."""
    if log.stop_s is None:
        return 0
    front = route_frenet(log.route, log.ego[:, :2])[0] + log.ego_size[0] / 2
    crossed = np.nonzero(front >= log.stop_s)[0]
    if not crossed.size or crossed[0] <= log.start_step:
        return 0
    zone = (front >= log.stop_s - STOP_ZONE_M) & (np.arange(len(front)) < crossed[0])
    return 0 if (log.ego[zone, 3] < STOP_SPEED).any() else 1


def route_completion(log: DriveLog) -> float:
    """RC (module docstring): on-route progress, less what was made outside the route's lanes, over the route."""
    ego = log.ego[log.start_step:]
    progress = route_progress(log)
    outside = ~on_drivable(log.road, ego[:, :2]) | in_oncoming_lane(log.road, ego[:, :2], ego[:, 2])
    gained = np.diff(progress, prepend=0.0)
    counted = float(progress[-1] - gained[outside].sum())
    if log.route_length <= 1.0:
        return 1.0
    return float(np.clip(counted / log.route_length, 0.0, 1.0))


def driving_scores(log: DriveLog) -> DrivingScores:
    counts = dict.fromkeys(PENALTIES, 0)
    for c in collisions(log):
        counts[_collision_key(c.kind)] += 1
    counts["stop_sign"] = stop_sign_infractions(log)
    ego = log.ego[log.start_step:]
    km = float(np.hypot(*np.diff(ego[:, :2], axis=0).T).sum()) / 1000.0
    return DrivingScores(route_completion(log), counts, km)

