"""The training objective's settings: plain data, torch-free, so the CLI builds its parser without torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_SECTION_WEIGHTS = {"trajectory": 3.0, "future_meta_behavior": 1.5, "critical_objects": 1.0,
                           "explanation": 0.5, "end": 1.0}


@dataclass(frozen=True)
class ObjectiveConfig:
    section_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SECTION_WEIGHTS))
    null_weight: float = 0.2  # null padding inside a slot
    structure_weight: float = 0.5  # template tokens a scaffold decoder never has to write
    tail_weight: float = 0.1  # end tokens that fill the last block after the answer's end
    ar_weight: float = 0.5  # auxiliary causal next-token loss; 0 skips its forward
    mask_ratio: tuple[float, float] = (0.0, 1.0)  # per-block ratio drawn uniformly in this range
    complementary: bool = True
