"""Decoders: short functions over a :class:`~blockpilot.runtime.backend.Backend`, torch-free."""

from .ar import ar_greedy
from .block import BlockOptions, block_threshold
from .common import CountingBackend, Decoded, ScaffoldLike
from .rollouts import RolloutOptions, shared_prefix_rollouts
from .speculative import SpeculativeOptions, scaffold_speculative, section_blocks

__all__ = [
    "BlockOptions",
    "CountingBackend",
    "Decoded",
    "RolloutOptions",
    "ScaffoldLike",
    "SpeculativeOptions",
    "ar_greedy",
    "block_threshold",
    "scaffold_speculative",
    "section_blocks",
    "shared_prefix_rollouts",
]
