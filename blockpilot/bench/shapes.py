"""What ``blockpilot bench`` takes by name (model shapes, dtypes) and its error: torch-free, so the command line
builds its parser on a machine without torch."""

from __future__ import annotations

from ..errors import BlockpilotError
from ..vla.config import LMConfig

SHAPES: dict[str, LMConfig] = {
    "1.5b": LMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                     num_kv_heads=2, rope_theta=1_000_000.0, tie_word_embeddings=True),
    "3b": LMConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                   num_kv_heads=2, rope_theta=1_000_000.0, tie_word_embeddings=True, mrope_section=(16, 24, 24)),
}
MODELS = ("reference", *SHAPES)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
DTYPE_NAMES = tuple(BYTES)  # models.DTYPES maps each to its torch dtype


class BenchError(BlockpilotError, ValueError):
    """A bench that cannot run as asked (unknown model or dtype, no such device)."""
