"""Frozen, validated model configuration.

Translation from and to Hugging Face ``config.json`` lives in :mod:`blockpilot.vla.hf_config`.
Block-diffusion settings (block size, mask token) live here and nowhere else: no other module may
hard-code them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import BlockpilotError

# Documented defaults of Fast-dLLM v2 / Fast-dDrive checkpoints (Qwen2 vocabulary): the mask is the
# tokenizer's added |<MASK>| token; the filler (null) is <|endoftext|>, a token the vocabulary has
# (see blockpilot.vla.special_tokens for how a checkpoint's own ids are chosen).
DEFAULT_MASK_TOKEN_ID = 151665
DEFAULT_NULL_TOKEN_ID = 151643
DEFAULT_END_TOKEN_ID = 151645
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SUB_BLOCK_SIZE = 8


class ConfigError(BlockpilotError, ValueError):
    """A configuration value is missing or inconsistent; the message names the field and file."""


def read_json_object(path: Path, error: type[Exception] = ConfigError,
                     expected: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` names the file for an unreadable file, bad JSON or another value."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True, slots=True)
class LMConfig:
    """Qwen2-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 32768
    tie_word_embeddings: bool = False
    # Qwen2.5-VL multimodal RoPE: rotary channel pairs given to (time, height, width).
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position"):
            require(getattr(self, name) > 0, f"LMConfig.{name} must be positive, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0,
                 f"LMConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                 f"({self.num_kv_heads})")
        require(self.head_dim >= 0, f"LMConfig.head_dim must be positive (or 0: derived), got {self.head_dim}")
        if self.head_dim == 0:
            require(self.hidden_size % self.num_heads == 0,
                     f"LMConfig.hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        require(self.rope_theta > 0, f"LMConfig.rope_theta must be positive, got {self.rope_theta}")
        require(self.rms_norm_eps > 0, f"LMConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}")
        require(self.head_dim % 2 == 0, f"LMConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            require(len(self.mrope_section) == 3 and min(self.mrope_section) >= 0
                     and sum(self.mrope_section) == self.head_dim // 2,
                     f"LMConfig.mrope_section {self.mrope_section} must have 3 parts summing to "
                     f"head_dim/2 = {self.head_dim // 2}")


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """Qwen2.5-VL vision tower (patch embed, 2-D RoPE, windowed + full attention, patch merger)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                     "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size"):
            require(getattr(self, name) > 0, f"VisionConfig.{name} must be positive")
        require(self.hidden_size % self.num_heads == 0,
                 f"VisionConfig.hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        require(not bad, f"VisionConfig.fullatt_block_indexes {bad} outside 0..{self.depth - 1}")
        require(self.window_size % (self.patch_size * self.spatial_merge_size) == 0,
                 "VisionConfig.window_size must be a multiple of patch_size * spatial_merge_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """Token ids the decoders and the schema rely on, read from the checkpoint when it has them."""

    mask: int = DEFAULT_MASK_TOKEN_ID
    null: int = DEFAULT_NULL_TOKEN_ID
    end: int = DEFAULT_END_TOKEN_ID
    pad: int | None = None
    image: int | None = None  # <|image_pad|>
    vision_start: int | None = None
    vision_end: int | None = None

    def __post_init__(self) -> None:
        require(len({self.mask, self.null, self.end}) == 3,
                 f"SpecialTokens: mask ({self.mask}), null ({self.null}) and end ({self.end}) must differ")


@dataclass(frozen=True, slots=True)
class BlockDiffusionConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    sub_block_size: int = DEFAULT_SUB_BLOCK_SIZE

    def __post_init__(self) -> None:
        require(self.block_size > 0, f"block_size (bd_size) must be positive, got {self.block_size}")
        require(0 < self.sub_block_size <= self.block_size and self.block_size % self.sub_block_size == 0,
                 f"sub_block_size ({self.sub_block_size}) must divide block_size (bd_size, {self.block_size})")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything needed to build a model: the LM, an optional vision tower, tokens, diffusion."""

    lm: LMConfig
    vision: VisionConfig | None = None
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    diffusion: BlockDiffusionConfig = field(default_factory=BlockDiffusionConfig)
    architecture: str = "qwen2"  # "qwen2" | "qwen2_5_vl": selects the checkpoint name mapping

    def __post_init__(self) -> None:
        require(self.architecture in ("qwen2", "qwen2_5_vl"),
                 f"architecture must be 'qwen2' or 'qwen2_5_vl', got {self.architecture!r}")
        if self.vision is not None:
            require(self.vision.out_hidden_size == self.lm.hidden_size,
                     f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal lm.hidden_size "
                     f"({self.lm.hidden_size})")
            require(self.tokens.image is not None, "a model with a vision tower needs tokens.image")
        for name in ("mask", "null", "end"):
            tid = getattr(self.tokens, name)
            require(0 <= tid < self.lm.vocab_size,
                     f"tokens.{name} = {tid} is outside the vocabulary (size {self.lm.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        vision = data.get("vision")
        return cls(
            lm=build_section(LMConfig, data["lm"], "lm"),
            vision=build_section(VisionConfig, vision, "vision") if vision else None,
            tokens=build_section(SpecialTokens, data.get("tokens", {}), "tokens"),
            diffusion=build_section(BlockDiffusionConfig, data.get("diffusion", {}), "diffusion"),
            architecture=data.get("architecture", "qwen2"),
        )


def _asdict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _asdict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def build_section(cls: Any, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    require(not unknown, f"unknown field(s) {unknown} in {where}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
