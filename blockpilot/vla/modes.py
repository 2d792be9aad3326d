"""Attention modes of one forward call (torch-free, so the runtime core can import it)."""

from __future__ import annotations

from enum import Enum


class AttentionMode(str, Enum):
    """Which keys a query may see.

    ``CAUSAL``: key slot <= query slot (AR decoding; also the "active block attends to the prefix
    and causally to itself" commit variant of Fast-dVLM / Fast-dDrive).
    ``BLOCK``: the Fast-dLLM v2 training / prefill mask: causal across blocks of ``block_size``,
    bidirectional inside a block; block boundaries at absolute slot multiples of ``block_size``.
    ``BIDIRECTIONAL``: the active window sees the whole cached prefix and all of itself (the
    block-diffusion denoising step).

    Each mode carries the integer :attr:`id` the exported ``lm_step`` graph, the TensorRT plugin and the
    Triton kernels take as their ``mode`` input (0, 1, 2); a bundle's spec records them as ``mode_ids``
    (:meth:`ids`). They are part of the graph format: never renumber them.
    """

    CAUSAL = "causal"
    BLOCK = "block"
    BIDIRECTIONAL = "bidirectional"

    @property
    def id(self) -> int:
        """The integer the graphs, the plugin and the kernels take for this mode."""
        return _MODE_IDS[self.value]

    @classmethod
    def ids(cls) -> dict[str, int]:
        """``{"causal": 0, "block": 1, "bidirectional": 2}``: the name -> id table an export records."""
        return {m.value: m.id for m in cls}

    @classmethod
    def from_id(cls, mode_id: int) -> AttentionMode:
        """The mode of an integer id; ``ValueError`` naming the valid ids otherwise."""
        for member in cls:
            if member.id == mode_id:
                return member
        raise ValueError(f"mode must be one of {cls.ids()}, got {mode_id!r}")


# The graph format's mode ids (never renumber: exported bundles carry them); read through AttentionMode.id.
_MODE_IDS = {AttentionMode.CAUSAL.value: 0, AttentionMode.BLOCK.value: 1, AttentionMode.BIDIRECTIONAL.value: 2}
