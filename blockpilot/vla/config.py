"""Frozen, validated model configuration.

Configs are read from a Hugging Face ``config.json`` (Qwen2 for Fast_dLLM_v2, Qwen2.5-VL for
Fast-dVLM / Fast-dDrive; both the flat layout of the original hub checkpoints and the nested
``text_config`` layout that transformers 5 writes).  Block-diffusion settings (block size, mask
token) live here and nowhere else: no other module may hard-code them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Documented defaults of Fast-dLLM v2 / Fast-dDrive checkpoints (Qwen2 vocabulary).
DEFAULT_MASK_TOKEN_ID = 151665
DEFAULT_NULL_TOKEN_ID = 151666
DEFAULT_END_TOKEN_ID = 151645
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SUB_BLOCK_SIZE = 8


class ConfigError(ValueError):
    """A configuration value is missing or inconsistent; the message names the field and file."""


def _require(cond: bool, msg: str) -> None:
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
            _require(getattr(self, name) > 0, f"LMConfig.{name} must be positive, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"LMConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                 f"({self.num_kv_heads})")
        if self.head_dim == 0:
            _require(self.hidden_size % self.num_heads == 0,
                     f"LMConfig.hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require(self.head_dim % 2 == 0, f"LMConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            _require(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
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
            _require(getattr(self, name) > 0, f"VisionConfig.{name} must be positive")
        _require(self.hidden_size % self.num_heads == 0,
                 f"VisionConfig.hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        _require(not bad, f"VisionConfig.fullatt_block_indexes {bad} outside 0..{self.depth - 1}")
        _require(self.window_size % (self.patch_size * self.spatial_merge_size) == 0,
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
        _require(len({self.mask, self.null, self.end}) == 3,
                 f"SpecialTokens: mask ({self.mask}), null ({self.null}) and end ({self.end}) must differ")


@dataclass(frozen=True, slots=True)
class BlockDiffusionConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    sub_block_size: int = DEFAULT_SUB_BLOCK_SIZE

    def __post_init__(self) -> None:
        _require(self.block_size > 0, f"block_size must be positive, got {self.block_size}")
        _require(0 < self.sub_block_size <= self.block_size and self.block_size % self.sub_block_size == 0,
                 f"sub_block_size ({self.sub_block_size}) must divide block_size ({self.block_size})")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything needed to build a model: the LM, an optional vision tower, tokens, diffusion."""

    lm: LMConfig
    vision: VisionConfig | None = None
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    diffusion: BlockDiffusionConfig = field(default_factory=BlockDiffusionConfig)
    architecture: str = "qwen2"  # "qwen2" | "qwen2_5_vl": selects the checkpoint name mapping

    def __post_init__(self) -> None:
        _require(self.architecture in ("qwen2", "qwen2_5_vl"),
                 f"architecture must be 'qwen2' or 'qwen2_5_vl', got {self.architecture!r}")
        if self.vision is not None:
            _require(self.vision.out_hidden_size == self.lm.hidden_size,
                     f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal lm.hidden_size "
                     f"({self.lm.hidden_size})")
            _require(self.tokens.image is not None, "a model with a vision tower needs tokens.image")
        for name in ("mask", "null", "end"):
            tid = getattr(self.tokens, name)
            _require(0 <= tid < self.lm.vocab_size,
                     f"tokens.{name} = {tid} is outside the vocabulary (size {self.lm.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        vision = data.get("vision")
        return cls(
            lm=_build(LMConfig, data["lm"], "lm"),
            vision=_build(VisionConfig, vision, "vision") if vision else None,
            tokens=_build(SpecialTokens, data.get("tokens", {}), "tokens"),
            diffusion=_build(BlockDiffusionConfig, data.get("diffusion", {}), "diffusion"),
            architecture=data.get("architecture", "qwen2"),
        )


def _asdict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _asdict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"unknown field(s) {unknown} in {where}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _pick(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def config_from_hf(hf: dict[str, Any], source: str = "config.json",
                   token_overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict (Qwen2 or Qwen2.5-VL) into a :class:`ModelConfig`.

    Block-diffusion fields are read when the checkpoint carries them (``bd_size`` / ``block_size``,
    ``mask_token_id``, ``null_token_id``); otherwise the documented Fast-dLLM v2 defaults apply.
    """
    model_type = hf.get("model_type", "")
    is_vl = model_type in ("qwen2_5_vl", "qwen2_vl") or "vision_config" in hf
    text = dict(hf)
    if isinstance(hf.get("text_config"), dict):
        # transformers 5 nests the LM fields; top-level values still win where both exist.
        text = {**hf["text_config"], **{k: v for k, v in hf.items() if k != "text_config"}}
    rope = _pick(text, "rope_parameters", "rope_scaling", default={}) or {}
    try:
        lm = LMConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(_pick(text, "num_key_value_heads", "num_attention_heads")),
            head_dim=int(_pick(text, "head_dim", default=0)) if not is_vl else 0,
            rope_theta=float(_pick(rope, "rope_theta", default=_pick(text, "rope_theta", default=1e6))),
            rms_norm_eps=float(_pick(text, "rms_norm_eps", default=1e-6)),
            max_position=int(_pick(text, "max_position_embeddings", default=32768)),
            tie_word_embeddings=bool(_pick(hf, "tie_word_embeddings", default=False)),
            mrope_section=tuple(rope["mrope_section"]) if is_vl and "mrope_section" in rope else None,
        )
    except KeyError as exc:
        raise ConfigError(f"{source}: required field {exc.args[0]!r} is missing") from exc
    vision = None
    if is_vl:
        v = hf.get("vision_config") or {}
        try:
            vision = VisionConfig(
                depth=int(v["depth"]),
                hidden_size=int(v["hidden_size"]),
                intermediate_size=int(v["intermediate_size"]),
                num_heads=int(v["num_heads"]),
                out_hidden_size=int(_pick(v, "out_hidden_size", default=lm.hidden_size)),
                patch_size=int(_pick(v, "patch_size", "spatial_patch_size", default=14)),
                temporal_patch_size=int(_pick(v, "temporal_patch_size", default=2)),
                spatial_merge_size=int(_pick(v, "spatial_merge_size", default=2)),
                window_size=int(_pick(v, "window_size", default=112)),
                fullatt_block_indexes=tuple(_pick(v, "fullatt_block_indexes", default=())),
                in_channels=int(_pick(v, "in_channels", "in_chans", default=3)),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: vision_config field {exc.args[0]!r} is missing") from exc
    eos = _pick(text, "end_token_id", "eos_token_id", default=DEFAULT_END_TOKEN_ID)
    token_fields: dict[str, Any] = {
        "mask": int(_pick(text, "mask_token_id", default=DEFAULT_MASK_TOKEN_ID)),
        "null": int(_pick(text, "null_token_id", default=DEFAULT_NULL_TOKEN_ID)),
        "end": int(eos[0] if isinstance(eos, list) else eos),
        "pad": _pick(text, "pad_token_id"),
        "image": _pick(text, "image_token_id", "image_token_index"),
        "vision_start": _pick(text, "vision_start_token_id"),
        "vision_end": _pick(text, "vision_end_token_id"),
    }
    token_fields.update(token_overrides or {})
    tokens = _build(SpecialTokens, token_fields, f"{source}: special tokens")
    diffusion = BlockDiffusionConfig(
        block_size=int(_pick(hf, "bd_size", "block_size", default=DEFAULT_BLOCK_SIZE)),
        sub_block_size=int(_pick(hf, "sub_block_size", default=DEFAULT_SUB_BLOCK_SIZE)),
    )
    try:
        return ModelConfig(lm=lm, vision=vision, tokens=tokens, diffusion=diffusion,
                           architecture="qwen2_5_vl" if is_vl else "qwen2")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(checkpoint_dir: str | Path, token_overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Read ``config.json`` from a local checkpoint directory (``token_overrides``: e.g. ``{"mask": 5}``)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf(data, source=str(path), token_overrides=token_overrides)
