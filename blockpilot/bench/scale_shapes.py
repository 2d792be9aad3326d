"""The shapes ``blockpilot bench scale`` runs, and a random-weight checkpoint of each in the hub layout.

Dimensions are those of the published ``config.json`` files: Fast_dLLM_v2_1.5B is Qwen2.5-1.5B-Instruct,
Fast_dLLM_v2_7B is Qwen2.5-7B-Instruct (untied, vocabulary 152064), the 3B VLA (Fast-dVLM / Fast-dDrive) is
Qwen2.5-VL-3B-Instruct with its vision tower; ``0.5b`` has Qwen2.5-0.5B-Instruct's dimensions in the
Fast_dLLM_v2 layout, and ``tiny`` is a scaled-down Fast_dLLM_v2 (about 42 M parameters, most of them the
151,936-row embedding) for CI. Weights are bf16 Normal(0, 0.02) matrices, unit norms and zero biases, written
tensor by tensor straight into safetensors shards (at most one tensor in memory), with
``model.safetensors.index.json`` as the hub has it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .published import (
    EMBEDDING_ROWS,
    PublishedLayoutError,
    preprocessor_config,
    qwen2_config,
    vl_hub_config,
    write_config,
    write_tokenizer_files,
    write_tokenizer_json,
)

SHARD_BYTES = 2 << 30  # hub-style shards, each under protobuf-free 2 GiB


@dataclass(frozen=True)
class ScaleShape:
    name: str
    text: dict[str, Any]
    tied: bool
    vocab_size: int = EMBEDDING_ROWS
    max_position: int = 32768
    vision: dict[str, Any] | None = None
    mrope_section: tuple[int, ...] = ()
    published_as: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_vl(self) -> bool:
        return self.vision is not None


def _text(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv}


SCALE_SHAPES: dict[str, ScaleShape] = {
    "tiny": ScaleShape("tiny", _text(256, 704, 4, 4, 2), tied=True, published_as="scaled-down Fast_dLLM_v2"),
    "0.5b": ScaleShape("0.5b", _text(896, 4864, 24, 14, 2), tied=True,
                       published_as="Qwen2.5-0.5B-Instruct dims, Fast_dLLM_v2 layout"),
    "1.5b": ScaleShape("1.5b", _text(1536, 8960, 28, 12, 2), tied=True, published_as="Efficient-Large-Model/"
                       "Fast_dLLM_v2_1.5B (Qwen2.5-1.5B-Instruct)"),
    "3b": ScaleShape("3b", _text(2048, 11008, 36, 16, 2), tied=True, max_position=128000,
                     vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                             "out_hidden_size": 2048, "patch_size": 14, "temporal_patch_size": 2,
                             "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                             "in_channels": 3, "hidden_act": "silu"},
                     mrope_section=(16, 24, 24), published_as="Fast-dVLM / Fast-dDrive (Qwen2.5-VL-3B-Instruct)"),
    "7b": ScaleShape("7b", _text(3584, 18944, 28, 28, 4), tied=False, vocab_size=152064,
                     published_as="Efficient-Large-Model/Fast_dLLM_v2_7B (Qwen2.5-7B-Instruct)"),
}


def hub_config(shape: ScaleShape) -> dict[str, Any]:
    if shape.vision is not None:
        return vl_hub_config(shape.text, shape.vision, list(shape.mrope_section), max_position=shape.max_position)
    return qwen2_config(shape.text, tied=shape.tied, vocab_size=shape.vocab_size, max_position=shape.max_position)


def tensor_shapes(shape: ScaleShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every stored tensor's hub name and shape, from transformers' own classes built on the meta device
    (a tied LM head is stored once, as the hub files have it)."""
    import torch

    if shape.vision is None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=shape.vocab_size, **shape.text, tie_word_embeddings=shape.tied,
                             max_position_embeddings=shape.max_position)
        with torch.device("meta"):
            model: Any = Qwen2ForCausalLM(config)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text = {**shape.text, "vocab_size": shape.vocab_size, "max_position_embeddings": shape.max_position,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                    "mrope_section": list(shape.mrope_section)}}
        vision = {k: v for k, v in shape.vision.items() if k != "hidden_act"}
        vl_config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(vl_config)
    out = []
    for name, p in model.named_parameters():  # tied parameters are listed once
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        elif name.startswith("model.visual."):
            name = "visual." + name[len("model.visual."):]
        out.append((name, tuple(p.shape)))
    return out


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _shards(tensors: list[tuple[str, tuple[int, ...]]]) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    shard: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, dims in tensors:
        nbytes = 2 * _numel(dims)
        if shard and size + nbytes > SHARD_BYTES:
            yield shard
            shard, size = [], 0
        shard.append((name, dims))
        size += nbytes
    if shard:
        yield shard


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """One safetensors file, header first, then each tensor generated and written on its own."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = 2 * _numel(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for index, (name, dims) in enumerate(tensors):
            t = torch.empty(dims, dtype=torch.bfloat16)
            if name.endswith("bias"):
                t.zero_()
            elif len(dims) == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed * 100_003 + index))
            f.write(t.view(torch.uint8).numpy().tobytes())
            del t


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    parameters: int
    weight_bytes: int
    shards: int


def write_checkpoint(shape: ScaleShape, out: Path, seed: int = 0) -> WrittenCheckpoint:
    """A random-weight checkpoint of ``shape`` under ``out`` (which must not exist): bf16 shards,
    ``model.safetensors.index.json``, the published ``config.json`` and the Qwen2.5 tokenizer (``tokenizer.json``
    layout; the 7B ships ``vocab.json`` + ``merges.txt`` as published)."""
    if out.exists():
        raise PublishedLayoutError(f"{out} already exists; the scale bench writes a fresh checkpoint")
    out.mkdir(parents=True)
    tensors = tensor_shapes(shape)
    groups = list(_shards(tensors))
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(out / file, group, seed + i)
        weight_map.update({name: file for name, _ in group})
    parameters = sum(_numel(d) for _, d in tensors)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * parameters}, "weight_map": weight_map}, indent=2) + "\n")
    write_config(out, hub_config(shape))
    if shape.name == "7b":
        write_tokenizer_files(out)
    else:
        files = out.parent / f".{out.name}-tokenizer-files"
        write_tokenizer_files(files)
        write_tokenizer_json(files, out)
        for f in files.iterdir():
            f.unlink()
        files.rmdir()
    if shape.is_vl:
        preprocessor_config(out)
    return WrittenCheckpoint(out, parameters, 2 * parameters, len(groups))
