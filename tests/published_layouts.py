"""Tiny checkpoints in the layouts Fast-dLLM v2 / Fast-dVLM / Fast-dDrive are published in.

Weights are written by transformers' own classes (``Qwen2ForCausalLM``,
``Qwen2_5_VLForConditionalGeneration``), then ``config.json`` is rewritten with the published keys.
The vocabulary is the real Qwen2.5 one in shape: 151,643 byte-level BPE entries (the reference
tokenizer's learned tokens first, then filler entries no merge produces), Qwen2.5's added tokens at
their real ids (151643 ``<|endoftext|>`` .. 151664), then ``|<MASK>|`` = 151665; the embedding has
151,936 rows as published. Each layout is written once per session.

- ``llm_1p5b``: Fast_dLLM_v2 1.5B: tied, one ``model.safetensors``, ``tokenizer.json``.
- ``llm_7b``: Fast_dLLM_v2 7B: untied, bf16, sharded with ``model.safetensors.index.json``, and the
  ``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` + ``tokenizer_config.json`` files only.
- ``vlm_hub``: Fast-dVLM / Fast-dDrive as on the hub: flat config, ``model.*`` / ``visual.*`` tensors.
- ``vlm_v5``: the same model as transformers 5 saves it: nested ``text_config``,
  ``model.language_model.*`` / ``model.visual.*`` tensors.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REFERENCE_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "reference" / "tokenizer.json"
REGULAR_VOCAB = 151643
EMBEDDING_ROWS = 151936
# Qwen2.5's added tokens (id, text, special) and Fast-dLLM v2's mask token after them.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    *((151643 + i, t, True) for i, t in enumerate((
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"))),
    *((151657 + i, t, False) for i, t in enumerate((
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>"))),
    (151665, "|<MASK>|", True),
)
MASK_ID, ENDOFTEXT_ID, IM_END_ID = 151665, 151643, 151645
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


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer_files(root: Path) -> None:
    """``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` + ``tokenizer_config.json`` (no tokenizer.json)."""
    ref = json.loads(REFERENCE_TOKENIZER.read_text())
    ref_special = {t["content"] for t in ref["added_tokens"]}
    learned = sorted((i, t) for t, i in ref["model"]["vocab"].items() if t not in ref_special)
    vocab = {t: n for n, (_, t) in enumerate(learned)}
    for combo in itertools.chain.from_iterable(itertools.product(_byte_alphabet(), repeat=k) for k in (2, 3)):
        if len(vocab) == REGULAR_VOCAB:
            break
        text = "".join(combo)
        if text not in vocab:
            vocab[text] = len(vocab)
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2", *(" ".join(m) if isinstance(m, list) else m for m in ref["model"]["merges"])]
    (root / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    (root / "added_tokens.json").write_text(json.dumps({t: i for i, t, _ in ADDED_TOKENS}, indent=2))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": s} for i, t, s in ADDED_TOKENS},
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }, indent=2))


def write_tokenizer_json(files_dir: Path, out: Path) -> None:
    """``tokenizer.json`` (and ``tokenizer_config.json``) as transformers writes them from the same files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files_dir))
    tok.save_pretrained(str(out))
    for extra in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / extra).unlink(missing_ok=True)  # the tokenizer.json layout: tokenizer.json + tokenizer_config.json


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.5 * noise)
        # Rows past the tokenizer's vocabulary are never trained in the published models.
        for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            p[ADDED_TOKENS[-1][0] + 1:] = 0.0


def _qwen2_published_config(tied: bool, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                     "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        "attention_dropout": 0.0, "bd_size": 32, "bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID,
        "hidden_act": "silu", **TEXT_DIMS, "initializer_range": 0.02, "max_position_embeddings": 32768,
        "max_window_layers": TEXT_DIMS["num_hidden_layers"], "model_type": "Fast_dLLM_Qwen", "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": tied,
        "torch_dtype": dtype, "transformers_version": "4.53.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": EMBEDDING_ROWS,
    }


def _vl_tokens() -> dict[str, Any]:
    return {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656}


def _write_config(path: Path, config: dict[str, Any]) -> None:
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").unlink(missing_ok=True)


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
    _write_config(path, _qwen2_published_config(tied, "bfloat16"))
    return model


def _build_vl(path: Path) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**TEXT_DIMS, "vocab_size": EMBEDDING_ROWS, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION}}
    vision = {k: v for k, v in VISION_DIMS.items() if k != "hidden_act"}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_vl_tokens(), tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _randomize(model, seed=3)
    model.save_pretrained(path)
    return model


def _vl_v5_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update({"architectures": ["Fast_dVLMForConditionalGeneration"], "model_type": "fast_dvlm",
                   "bd_size": 32, "torch_dtype": "float32"})
    _write_config(path, config)


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
    _write_config(dst, {
        "architectures": ["Fast_dVLMForConditionalGeneration"], "model_type": "fast_dvlm",
        "attention_dropout": 0.0, **_vl_tokens(), "hidden_act": "silu", **TEXT_DIMS, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "max_window_layers": TEXT_DIMS["num_hidden_layers"],
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "use_cache": True, "use_sliding_window": False,
        "vocab_size": EMBEDDING_ROWS, "bd_size": 32,
        "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
        "vision_config": {**VISION_DIMS, "model_type": "qwen2_5_vl", "tokens_per_second": 2},
    })


def _preprocessor(path: Path) -> None:
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
        "min_pixels": 3136, "patch_size": 14, "processor_class": "Qwen2_5_VLProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2,
    }, indent=2))


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
            _preprocessor(layout.path)
    return out
