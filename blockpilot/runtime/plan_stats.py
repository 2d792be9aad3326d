"""What a plan cost (:class:`PlanStats`) and how its rollouts disagree (:class:`RolloutSpread`), torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, eq=False)
class RolloutSpread:
    """How N sampled trajectories disagree. ``waypoints`` ``(R, K, D)`` holds the rollouts that
    parsed; ``std`` and ``max_deviation`` ``(K,)`` are the root-mean-square and the largest
    distance of a rollout's waypoint from the mean, per waypoint."""

    waypoints: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    max_deviation: npt.NDArray[np.float64]

    @property
    def count(self) -> int:
        return int(self.waypoints.shape[0])


def rollout_spread(waypoints: Sequence[npt.ArrayLike]) -> RolloutSpread:
    """Mean and spread of one or more ``(K, D)`` trajectories of the same shape."""
    stack = np.stack([np.asarray(w, dtype=np.float64) for w in waypoints])
    mean = stack.mean(axis=0)
    dist = np.linalg.norm(stack - mean, axis=-1)
    return RolloutSpread(stack, mean, np.sqrt((dist**2).mean(axis=0)), dist.max(axis=0))


@dataclass(frozen=True)
class PlanStats:
    """Cost of one plan. ``forwards`` counts backend calls (the NFE, prefill included);
    ``row_forwards`` weighs each by its batch rows; ``tokens`` counts answer tokens per row;
    ``stage_ms`` holds prompt, vision, prefill, decode, parse and total; ``constrained`` whether the value
    slots were decoded under their allowed-token masks."""

    decoder: str
    settings: Mapping[str, Any]
    forwards: int
    row_forwards: int
    prefill_forwards: int
    decode_forwards: int
    tokens: int
    rows: int
    tokens_per_forward: float
    prompt_tokens: int
    image_tokens: int
    stop: str
    stage_ms: Mapping[str, float] = field(default_factory=dict)
    # Whether value slots were decoded under their allowed-token masks (typed slots); False for the free
    # decoders and on a backend that cannot apply them (a bundle exported before they existed).
    constrained: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["settings"] = dict(self.settings)
        out["tokens_per_forward"] = round(self.tokens_per_forward, 3)
        out["stage_ms"] = {k: round(v, 3) for k, v in self.stage_ms.items()}
        return out
