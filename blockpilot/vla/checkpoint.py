"""Local Hugging Face checkpoints (safetensors) with explicit name mapping.

Loading is all-or-nothing: every tensor is read and checked (present, expected shape, floating
dtype) into a fresh state dict before the model is touched, so a bad checkpoint raises a
:class:`CheckpointError` naming the tensor and file and leaves the model as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic_io import atomic_path
from ..errors import BlockpilotError
from .safetensors_read import SafetensorsFormatError, TensorEntry, read_header, read_into

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(BlockpilotError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names what and where."""


# (HF name pattern, our name template). The first matching rule wins; a name no rule matches
# is an unexpected tensor. Our module tree mirrors HF names below these prefixes.
Qwen2Rules = (
    (r"^model\.(.+)$", r"\1"),
    (r"^lm_head\.weight$", "lm_head.weight"),
)
Qwen25VLRules = (
    # transformers >= 4.52 / 5.x layout
    (r"^model\.language_model\.(.+)$", r"lm.\1"),
    (r"^model\.visual\.(.+)$", r"visual.\1"),
    # original hub layout (Qwen2.5-VL-3B-Instruct, Fast-dVLM, Fast-dDrive)
    (r"^model\.(.+)$", r"lm.\1"),
    (r"^visual\.(.+)$", r"visual.\1"),
    (r"^lm_head\.weight$", "lm.lm_head.weight"),
)
NAME_RULES: dict[str, tuple[tuple[str, str], ...]] = {"qwen2": Qwen2Rules, "qwen2_5_vl": Qwen25VLRules}
# Buffers some exporters store that we recompute.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Our names -> HF names when we write a checkpoint (the layout transformers 5 writes).
SAVE_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2": ((r"^lm_head\.weight$", "lm_head.weight"), (r"^(.+)$", r"model.\1")),
    "qwen2_5_vl": (
        (r"^lm\.lm_head\.weight$", "lm_head.weight"),
        (r"^lm\.(.+)$", r"model.language_model.\1"),
        (r"^visual\.(.+)$", r"model.visual.\1"),
    ),
}


def renamer(rules: Iterable[tuple[str, str]]) -> Callable[[str], str | None]:
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(name: str) -> str | None:
        for pattern, repl in compiled:
            if pattern.match(name):
                return pattern.sub(repl, name)
        return None

    return rename


def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every shard the index names."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({root / f for f in weight_map.values()})
    elif (root / SINGLE_FILE).is_file():
        files = [root / SINGLE_FILE]
    else:
        raise CheckpointError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard named in {INDEX_FILE} is missing")
    return files


def read_tensors(checkpoint_dir: str | Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of a checkpoint with the file it came from."""
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in checkpoint_files(checkpoint_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if name in out:
                        raise CheckpointError(f"{path}: tensor {name!r} also stored in {out[name][1]}")
                    out[name] = (f.get_tensor(name), path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    return out


def checkpoint_headers(checkpoint_dir: str | Path) -> list[tuple[Path, list[TensorEntry]]]:
    """Every safetensors file of a checkpoint with its tensor entries, from the headers alone (no weight read)."""
    out = []
    for path in checkpoint_files(checkpoint_dir):
        try:
            out.append((path, read_header(path)))
        except (SafetensorsFormatError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    return out


def stored_dtype(checkpoint_dir: str | Path) -> str:
    """The dtype a checkpoint's floating-point weights are stored in, from the safetensors headers (``config.json``'s
    ``torch_dtype`` can disagree with the files): ``bfloat16`` or ``float16`` when every float tensor is, else
    ``float32`` (the widest: mixed bf16/fp16/fp32 files, float64, or no float tensor at all)."""
    found = {entry.dtype for _, entries in checkpoint_headers(checkpoint_dir) for entry in entries
             if entry.dtype.is_floating_point}
    if found == {torch.bfloat16}:
        return "bfloat16"
    if found == {torch.float16}:
        return "float16"
    return "float32"


def load_weights(model: nn.Module, checkpoint_dir: str | Path, architecture: str) -> None:
    """Load a local HF checkpoint into ``model`` under the name rules of ``architecture``.

    Every file's header is checked first (names, shapes, floating dtypes, byte ranges: nothing is read or written
    before the whole checkpoint fits); then each tensor is read straight into its parameter
    (:mod:`blockpilot.vla.safetensors_read`), so peak memory is the model plus its largest tensor."""
    if architecture not in NAME_RULES:
        raise CheckpointError(f"no checkpoint name mapping for architecture {architecture!r}")
    rename = renamer(NAME_RULES[architecture])
    expected = model.state_dict()
    tied = _tied_names(model)
    plan: dict[Path, list[tuple[TensorEntry, str]]] = {}
    seen: dict[str, Path] = {}
    unexpected: list[str] = []
    for path, entries in checkpoint_headers(checkpoint_dir):
        for entry in entries:
            hf_name = entry.name
            if hf_name in seen:
                raise CheckpointError(f"{path}: tensor {hf_name!r} also stored in {seen[hf_name]}")
            seen[hf_name] = path
            if IGNORED.search(hf_name):
                continue
            ours = rename(hf_name)
            if ours is None or ours not in expected:
                unexpected.append(f"{hf_name} ({path.name})")
                continue
            if ours in tied:
                continue
            target = expected[ours]
            if entry.shape != tuple(target.shape):
                raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {entry.shape}, "
                                      f"the model expects {tuple(target.shape)} for {ours}")
            if not entry.dtype.is_floating_point:
                raise CheckpointError(f"{path}: tensor {hf_name!r} has dtype {entry.dtype}, "
                                      f"expected a floating-point dtype for {ours}")
            plan.setdefault(path, []).append((entry, ours))
    if unexpected:
        raise CheckpointError(f"{checkpoint_dir}: {len(unexpected)} tensor(s) the model does not have: "
                              + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    staged = {ours for entries in plan.values() for _, ours in entries}
    missing = sorted(n for n in expected if n not in staged and n not in tied)
    if missing:
        to_hf = renamer(SAVE_RULES[architecture])
        named = [f"{to_hf(n)} (for {n})" for n in missing[:5]]
        raise CheckpointError(f"{checkpoint_dir}: {len(missing)} missing tensor(s) " + ", ".join(named)
                              + (" ..." if len(missing) > 5 else ""))
    for path, reads in plan.items():
        try:
            with path.open("rb", buffering=0) as fh:
                for entry, ours in sorted(reads, key=lambda e: e[0].start):  # sequential reads
                    read_into(fh, entry, expected[ours], path)
        except (SafetensorsFormatError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


def save_weights(model: nn.Module, checkpoint_dir: str | Path, architecture: str) -> Path:
    """Write ``model`` as ``model.safetensors`` in the HF layout of ``architecture``."""
    if architecture not in SAVE_RULES:
        raise CheckpointError(f"no checkpoint name mapping for architecture {architecture!r}")
    rename = renamer(SAVE_RULES[architecture])
    tied = _tied_names(model)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        hf = rename(name)
        if hf is None:
            raise CheckpointError(f"no HF name for parameter {name!r} under {architecture}")
        tensors[hf] = tensor.detach().contiguous().cpu()
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / SINGLE_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    # A leftover index would make readers take the old shards instead of the file just written.
    (root / INDEX_FILE).unlink(missing_ok=True)
    return path


def _tied_names(model: nn.Module) -> set[str]:
    """Names that alias an earlier parameter (tied LM head): loaded through the first name."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
