"""Hugging Face ``config.json`` <-> :class:`ModelConfig`.

Reads Qwen2 (Fast_dLLM_v2) and Qwen2.5-VL (Fast-dVLM / Fast-dDrive) configs, both the flat layout
of the original hub checkpoints and the nested ``text_config`` layout that transformers 5 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SUB_BLOCK_SIZE,
    BlockDiffusionConfig,
    ConfigError,
    LMConfig,
    ModelConfig,
    SpecialTokens,
    VisionConfig,
    build_section,
    require,
)
from .special_tokens import read_added_tokens, resolve_special_ids

# transformers' defaults for fields a config.json may leave out (so both read a file the same way).
QWEN2_ROPE_THETA = 10_000.0
QWEN2_5_VL_ROPE_THETA = 1_000_000.0
DEFAULT_MROPE_SECTION = (16, 24, 24)
DEFAULT_FULLATT_BLOCK_INDEXES = (7, 15, 23, 31)

_MISSING: Any = object()


def _convert(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    return kind(value)


class _Fields:
    """Typed reads from one section of a HF config; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], source: str, section: str = "") -> None:
        self.data = data
        self.source = source
        self.section = section

    def where(self, name: str) -> str:
        return f"{self.source}: field '{self.section}{name}'"

    def get(self, *names: str, kind: type = int, default: Any = _MISSING) -> Any:
        for name in names:
            value = self.data.get(name)
            if value is not None:
                return _convert(value, kind, self.where(name))
        if default is _MISSING:
            raise ConfigError(f"{self.where(names[0])} is required but missing")
        return default

    def ints(self, name: str, default: Any) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, list):
            raise ConfigError(f"{self.where(name)} must be a list of int, got {value!r}")
        return tuple(_convert(v, int, self.where(name)) for v in value)

    def token(self, *names: str, default: Any = None) -> Any:
        """A token id; ``eos_token_id`` may be a list, whose first entry is the end token."""
        for name in names:
            value = self.data.get(name)
            if isinstance(value, list):
                if not value:
                    raise ConfigError(f"{self.where(name)} is an empty list")
                value = value[0]
            if value is not None:
                return _convert(value, int, self.where(name))
        return default


def config_from_hf(hf: dict[str, Any], source: str = "config.json",
                   token_overrides: dict[str, Any] | None = None,
                   added_tokens: tuple[dict[str, int], str] | None = None) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict (Qwen2 or Qwen2.5-VL) into a :class:`ModelConfig`.

    Block-diffusion fields are read when the checkpoint carries them (``bd_size`` / ``block_size``,
    ``sub_block_size``, ``mask_token_id``, ``null_token_id``); otherwise the published Fast-dLLM v2
    ``generate`` defaults apply (``bd_size`` 32, sub-block 8), and mask and filler come from the tokenizer's
    ``added_tokens`` (text -> id, and the file they came from; see :mod:`blockpilot.vla.special_tokens`).
    Fields a config may omit default as transformers defaults them. Every error is a :class:`ConfigError`
    naming ``source`` and the field.
    """
    try:
        return _config_from_hf(hf, source, token_overrides, added_tokens)
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{source}: {exc}") from exc


def _config_from_hf(hf: dict[str, Any], source: str, token_overrides: dict[str, Any] | None,
                    added_tokens: tuple[dict[str, int], str] | None) -> ModelConfig:
    model_type = hf.get("model_type", "")
    require(model_type != "qwen2_vl",
             f"{source}: model_type 'qwen2_vl' (Qwen2-VL) is not supported; Qwen2.5-VL is")
    is_vl = model_type == "qwen2_5_vl" or "vision_config" in hf
    nested = hf.get("text_config")
    text = dict(hf)
    if isinstance(nested, dict):
        # transformers 5 nests the LM fields; top-level values still win where both exist.
        text = {**nested, **{k: v for k, v in hf.items() if k != "text_config"}}
    t = _Fields(text, source)
    rope_key = next((k for k in ("rope_parameters", "rope_scaling") if isinstance(text.get(k), dict)), "")
    rope = _Fields(text.get(rope_key, {}), source, f"{rope_key}.")
    rope_type = rope.data.get("rope_type", rope.data.get("type", "default"))
    require(rope_type in ("default", "mrope"),
             f"{rope.where('rope_type')}: RoPE scaling {rope_type!r} is not supported")
    require(not text.get("use_sliding_window"), f"{t.where('use_sliding_window')}: sliding-window attention "
             "is not supported")
    require(text.get("hidden_act", "silu") == "silu",
             f"{t.where('hidden_act')} must be 'silu', got {text.get('hidden_act')!r}")
    default_theta = QWEN2_5_VL_ROPE_THETA if is_vl else QWEN2_ROPE_THETA
    tied = _Fields(hf, source).get("tie_word_embeddings", kind=bool, default=False)
    if isinstance(nested, dict):
        # Configs saved before transformers 5 may keep the flag inside text_config only.
        tied = tied or _Fields(nested, source, "text_config.").get("tie_word_embeddings", kind=bool, default=False)
    lm = LMConfig(
        vocab_size=t.get("vocab_size"),
        hidden_size=t.get("hidden_size"),
        intermediate_size=t.get("intermediate_size"),
        num_layers=t.get("num_hidden_layers"),
        num_heads=t.get("num_attention_heads"),
        num_kv_heads=t.get("num_key_value_heads", "num_attention_heads"),
        # Qwen2.5-VL's text attention always uses hidden_size // num_heads.
        head_dim=0 if is_vl else t.get("head_dim", default=0),
        rope_theta=rope.get("rope_theta", kind=float, default=None) or t.get("rope_theta", kind=float,
                                                                             default=default_theta),
        rms_norm_eps=t.get("rms_norm_eps", kind=float, default=1e-6),
        max_position=t.get("max_position_embeddings", default=32768),
        tie_word_embeddings=tied,
        mrope_section=rope.ints("mrope_section", DEFAULT_MROPE_SECTION) if is_vl else None,
    )
    vision = _vision_from_hf(hf, source, lm.hidden_size) if is_vl else None
    token_fields: dict[str, Any] = {
        **resolve_special_ids(t.token, added_tokens, source),
        "pad": t.token("pad_token_id"),
        "image": t.token("image_token_id", "image_token_index"),
        "vision_start": t.token("vision_start_token_id"),
        "vision_end": t.token("vision_end_token_id"),
    }
    token_fields.update(token_overrides or {})
    tokens = build_section(SpecialTokens, token_fields, "special tokens")
    diffusion = BlockDiffusionConfig(
        block_size=t.get("bd_size", "block_size", default=DEFAULT_BLOCK_SIZE),
        sub_block_size=t.get("sub_block_size", default=DEFAULT_SUB_BLOCK_SIZE),
    )
    return ModelConfig(lm=lm, vision=vision, tokens=tokens, diffusion=diffusion,
                       architecture="qwen2_5_vl" if is_vl else "qwen2")


def _vision_from_hf(hf: dict[str, Any], source: str, lm_hidden: int) -> VisionConfig:
    raw = hf.get("vision_config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field 'vision_config' is required for Qwen2.5-VL and must be an object")
    v = _Fields(raw, source, "vision_config.")
    depth = v.get("depth")
    return VisionConfig(
        depth=depth,
        hidden_size=v.get("hidden_size"),
        intermediate_size=v.get("intermediate_size"),
        num_heads=v.get("num_heads"),
        out_hidden_size=v.get("out_hidden_size", default=lm_hidden),
        patch_size=v.get("patch_size", "spatial_patch_size", default=14),
        temporal_patch_size=v.get("temporal_patch_size", default=2),
        spatial_merge_size=v.get("spatial_merge_size", default=2),
        window_size=v.get("window_size", default=112),
        # transformers' default list, of which a shallower tower only has the layers it has.
        fullatt_block_indexes=v.ints("fullatt_block_indexes",
                                     tuple(i for i in DEFAULT_FULLATT_BLOCK_INDEXES if i < depth)),
        in_channels=v.get("in_channels", "in_chans", default=3),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict of ``config`` in the layout transformers 5 writes (inverse of
    :func:`config_from_hf`), with the block-diffusion fields beside the standard ones."""
    lm = config.lm
    text: dict[str, Any] = {
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": lm.max_position,
        "rms_norm_eps": lm.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "use_sliding_window": False,
        "eos_token_id": config.tokens.end,
    }
    if config.tokens.pad is not None:
        text["pad_token_id"] = config.tokens.pad
    extra: dict[str, Any] = {
        "bd_size": config.diffusion.block_size,
        "sub_block_size": config.diffusion.sub_block_size,
        "mask_token_id": config.tokens.mask,
        "null_token_id": config.tokens.null,
    }
    for name in ("image", "vision_start", "vision_end"):
        if getattr(config.tokens, name) is not None:
            extra[f"{name}_token_id"] = getattr(config.tokens, name)
    if config.architecture == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **text, "head_dim": lm.head_dim,
                "tie_word_embeddings": lm.tie_word_embeddings, **extra}
    vision = config.vision
    if vision is None or lm.mrope_section is None:
        raise ConfigError("config_to_hf: a qwen2_5_vl config needs a vision tower and lm.mrope_section")
    require(lm.head_dim * lm.num_heads == lm.hidden_size,
             f"config_to_hf: Qwen2.5-VL cannot express head_dim {lm.head_dim} != hidden_size / num_heads")
    text["rope_parameters"]["mrope_section"] = list(lm.mrope_section)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": {"model_type": "qwen2_5_vl_text", **text},
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": vision.depth,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "out_hidden_size": vision.out_hidden_size,
            "hidden_act": "silu",
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "in_channels": vision.in_channels,
        },
        "tie_word_embeddings": lm.tie_word_embeddings,
        **extra,
    }


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
    return config_from_hf(data, source=str(path), token_overrides=token_overrides,
                          added_tokens=read_added_tokens(checkpoint_dir))
