"""Decoders: short functions over a :class:`~blockpilot.runtime.backend.Backend`, torch-free."""

from .ar import ArOptions, ar_greedy
from .block import SUB_BLOCK_RULES, BlockOptions, block_threshold
from .common import CountingBackend, Decoded, MaskInPromptError, ScaffoldLike, check_no_mask
from .rollouts import RolloutOptions, shared_prefix_rollouts
from .speculative import SpeculativeOptions, scaffold_speculative, section_blocks

__all__ = [
    "SUB_BLOCK_RULES",
    "ArOptions",
    "BlockOptions",
    "CountingBackend",
    "Decoded",
    "MaskInPromptError",
    "RolloutOptions",
    "ScaffoldLike",
    "SpeculativeOptions",
    "ar_greedy",
    "block_threshold",
    "check_no_mask",
    "scaffold_speculative",
    "section_blocks",
    "shared_prefix_rollouts",
]
