"""The published Fast-dLLM v2 / Fast-dVLM / Fast-dDrive checkpoint files other than the weights: the Qwen2.5
tokenizer (in shape: 151,643 byte-level BPE entries, Qwen2.5's added tokens at their real ids 151643 ..
151664, then ``|<MASK>|`` = 151665) and the ``config.json`` of each layout, for any dimensions.

The vocabulary starts with the reference tokenizer's learned tokens, then filler entries no merge produces,
so that every special id is where the published tokenizer has it. The embedding has 151,936 rows as published.
Used by the scale bench (real shapes) and by the tests' tiny published layouts.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from ..errors import BlockpilotError

REFERENCE_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "reference" / "tokenizer.json"
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


class PublishedLayoutError(BlockpilotError, RuntimeError):
    """A published-layout file could not be written (missing reference tokenizer, bad dimensions)."""


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer_files(root: Path) -> None:
    """``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` + ``tokenizer_config.json`` (no tokenizer.json)."""
    if not REFERENCE_TOKENIZER.is_file():
        raise PublishedLayoutError(f"the reference tokenizer {REFERENCE_TOKENIZER} is missing")
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


def qwen2_config(dims: dict[str, Any], *, tied: bool, dtype: str = "bfloat16",
                 vocab_size: int = EMBEDDING_ROWS, max_position: int = 32768) -> dict[str, Any]:
    """Fast_dLLM_v2's ``config.json`` (Qwen2.5 LM keys plus ``bd_size``) for ``dims`` (hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads)."""
    return {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                     "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        "attention_dropout": 0.0, "bd_size": 32, "bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID,
        "hidden_act": "silu", **dims, "initializer_range": 0.02, "max_position_embeddings": max_position,
        "max_window_layers": dims["num_hidden_layers"], "model_type": "Fast_dLLM_Qwen", "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": max_position, "tie_word_embeddings": tied,
        "torch_dtype": dtype, "transformers_version": "4.53.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def vl_tokens() -> dict[str, Any]:
    return {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656}


def vl_hub_config(text_dims: dict[str, Any], vision_dims: dict[str, Any], mrope_section: list[int], *,
                  dtype: str = "bfloat16", max_position: int = 32768) -> dict[str, Any]:
    """Fast-dVLM / Fast-dDrive's flat ``config.json`` as on the hub (Qwen2.5-VL keys of transformers 4.x plus
    ``bd_size``); ``vision_dims`` are the ``vision_config`` keys."""
    return {
        "architectures": ["Fast_dVLMForConditionalGeneration"], "model_type": "fast_dvlm",
        "attention_dropout": 0.0, **vl_tokens(), "hidden_act": "silu", **text_dims, "initializer_range": 0.02,
        "max_position_embeddings": max_position, "max_window_layers": text_dims["num_hidden_layers"],
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": dtype, "transformers_version": "4.51.3", "use_cache": True, "use_sliding_window": False,
        "vocab_size": EMBEDDING_ROWS, "bd_size": 32,
        "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
        "vision_config": {**vision_dims, "model_type": "qwen2_5_vl", "tokens_per_second": 2},
    }


def write_config(path: Path, config: dict[str, Any]) -> None:
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").unlink(missing_ok=True)


def preprocessor_config(path: Path) -> None:
    """Qwen2.5-VL's ``preprocessor_config.json`` as published."""
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
        "min_pixels": 3136, "patch_size": 14, "processor_class": "Qwen2_5_VLProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2,
    }, indent=2))
