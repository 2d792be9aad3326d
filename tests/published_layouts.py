"""Tiny checkpoints in the layouts Fast-dLLM v2 / Fast-dVLM / Fast-dDrive are published in.

Weights are written by transformers' own classes (``Qwen2ForCausalLM``,
``Qwen2_5_VLForConditionalGeneration``), then ``config.json`` is rewritten with the published keys.
The tokenizer and the config.json builders live in ``blockpilot.bench.published`` (the scale bench uses them too).
The tokenizer has Qwen2.5's vocabulary size and special ids; the embedding has 151,936 rows as published.
Each layout is written once per session.

- ``llm_1p5b``: Fast_dLLM_v2 1.5B: tied, one ``model.safetensors``, ``tokenizer.json``.
- ``llm_7b``: Fast_dLLM_v2 7B: untied, bf16, sharded with ``model.safetensors.index.json``, and the
  ``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` + ``tokenizer_config.json`` files only.
- ``vlm_hub``: Fast-dVLM / Fast-dDrive as on the hub: flat config, ``model.*`` / ``visual.*`` tensors.
- ``vlm_v5``: the same model as transformers 5 saves it: nested ``text_config``,
  ``model.language_model.*`` / ``model.visual.*`` tensors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blockpilot.bench.published import (
    ADDED_TOKENS,
    EMBEDDING_ROWS,
    ENDOFTEXT_ID,
    IM_END_ID,
    MASK_ID,
    preprocessor_config,
    qwen2_config,
    vl_hub_config,
    vl_tokens,
    write_config,
    write_tokenizer_files,
    write_tokenizer_json,
)

__all__ = ["ADDED_TOKENS", "ENDOFTEXT_ID", "IM_END_ID", "LAYOUTS", "MASK_ID", "Layout", "build_layouts"]

LAYOUTS = ("llm_1p5b", "llm_7b", "vlm_hub", "vlm_v5")
TEXT_DIMS: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2}
VISION_DIMS: dict[str, Any] = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                               "out_hidden_size": 32, "patch_size": 14, "temporal_patch_size": 2,
                               "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
                               "in_channels": 3, "hidden_act": "silu"}
MROPE_SECTION = [2, 1, 1]  # head_dim 8


@dataclass
class Layout:
    path: Path
    hf: Any  # the transformers model that wrote the weights (fp32, eval)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.5 * noise)
        # Rows past the tokenizer's vocabulary are never trained in the published models.
        for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            p[ADDED_TOKENS[-1][0] + 1:] = 0.0


def _build_qwen2(path: Path, tied: bool, bf16: bool) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=EMBEDDING_ROWS, **TEXT_DIMS, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=tied, eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID)
    model = Qwen2ForCausalLM(config).eval()
    _randomize(model, seed=1 if tied else 2)
    if bf16:
        model = model.to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="8MB")
        # The reference: the bf16 weights widened to fp32 in a fresh model (whose RoPE buffers stayed fp32).
        widened = {k: v.float() for k, v in model.state_dict().items()}
        model = Qwen2ForCausalLM(config).eval()
        model.load_state_dict(widened)
    else:
        model.save_pretrained(path)
    write_config(path, qwen2_config(TEXT_DIMS, tied=tied))
    return model


def _build_vl(path: Path) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**TEXT_DIMS, "vocab_size": EMBEDDING_ROWS, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION}}
    vision = {k: v for k, v in VISION_DIMS.items() if k != "hidden_act"}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **vl_tokens(), tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _randomize(model, seed=3)
    model.save_pretrained(path)
    return model


def _vl_v5_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update({"architectures": ["Fast_dVLMForConditionalGeneration"], "model_type": "fast_dvlm",
                   "bd_size": 32, "torch_dtype": "float32"})
    write_config(path, config)


def _vl_hub_layout(src: Path, dst: Path) -> None:
    """The hub naming (``model.*`` / ``visual.*``) and flat config of pre-transformers-5 checkpoints."""
    dst.mkdir(parents=True)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        elif name.startswith("model.visual."):
            name = "visual." + name[len("model.visual."):]
        renamed[name] = t
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    write_config(dst, vl_hub_config(TEXT_DIMS, VISION_DIMS, MROPE_SECTION))


def build_layouts(root: Path) -> dict[str, Layout]:
    """Every layout under ``root`` (about ten seconds; the session fixture calls it once)."""
    files, tok_json = root / "tokenizer-files", root / "tokenizer-json"
    write_tokenizer_files(files)
    write_tokenizer_json(files, tok_json)

    def add_tokenizer(path: Path, source: Path) -> None:
        for f in source.iterdir():
            shutil.copy(f, path / f.name)

    out = {
        "llm_1p5b": Layout(root / "llm_1p5b", _build_qwen2(root / "llm_1p5b", tied=True, bf16=False)),
        "llm_7b": Layout(root / "llm_7b", _build_qwen2(root / "llm_7b", tied=False, bf16=True)),
    }
    vl = _build_vl(root / "vlm_v5")
    _vl_hub_layout(root / "vlm_v5", root / "vlm_hub")
    _vl_v5_config(root / "vlm_v5")
    out["vlm_hub"] = Layout(root / "vlm_hub", vl)
    out["vlm_v5"] = Layout(root / "vlm_v5", vl)
    for name, layout in out.items():
        add_tokenizer(layout.path, files if name == "llm_7b" else tok_json)
        if name.startswith("vlm"):
            preprocessor_config(layout.path)
    return out
