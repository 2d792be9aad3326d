"""Which token ids mean mask, filler (``null``) and end: one function of the config and the tokenizer.

Published Fast-dLLM v2 / Fast-dVLM / Fast-dDrive checkpoints name no mask id in ``config.json``; the
mask is the tokenizer's added token ``|<MASK>|`` (151665, the last id of the published vocabulary).
They name no filler either. The scaffold pads a value shorter than its slot with the filler, so the
filler must be a token the vocabulary has, that encodes to itself, that differs from mask and end,
and that never occurs inside an answer. In order of preference:

1. ``null_token_id`` from ``config.json`` (the shipped reference model carries one);
2. Qwen's ``<|endoftext|>`` (151643): an added special token, the pad/document-separator token of
   Qwen2 / Qwen2.5, which a chat answer never contains;
3. ``<|fim_pad|>`` (151662) when ``<|endoftext|>`` is the end token (Qwen base models end with it).

Resolution reads only the checkpoint's tokenizer metadata (the added tokens), not the whole
tokenizer, so it stays cheap; :class:`~blockpilot.vla.tokenizer.Tokenizer` later checks that each id
is an added token that encodes to itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_END_TOKEN_ID,
    DEFAULT_MASK_TOKEN_ID,
    DEFAULT_NULL_TOKEN_ID,
    ConfigError,
    read_json_object,
)

MASK_TEXT = "|<MASK>|"
FILLER_TEXTS = ("<|endoftext|>", "<|fim_pad|>")
TOKENIZER_JSON = "tokenizer.json"
ADDED_TOKENS_JSON = "added_tokens.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"


def _token_id(value: Any, where: str, error: type[ConfigError] = ConfigError) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise error(f"{where}: token id must be a non-negative int, got {value!r}")
    return value


def read_added_files(root: Path, error: type[ConfigError] = ConfigError,
                     ) -> tuple[dict[int, tuple[str, bool]], list[str]]:
    """id -> (text, special) from ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``
    (the added tokens of copies that ship ``vocab.json`` + ``merges.txt``), and the files read."""
    added: dict[int, tuple[str, bool]] = {}
    sources: list[str] = []
    if (path := root / ADDED_TOKENS_JSON).is_file():
        for text, tid in read_json_object(path, error).items():
            added[_token_id(tid, f"{path}: field {text!r}", error)] = (text, True)
        sources.append(str(path))
    if (path := root / TOKENIZER_CONFIG_JSON).is_file():
        decoder = read_json_object(path, error).get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise error(f"{path}: field 'added_tokens_decoder' must be an object")
        for key, entry in decoder.items():
            if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise error(f"{path}: field 'added_tokens_decoder.{key}' must map a numeric id to an object with a "
                            "'content' string")
            tid, text = int(key), entry["content"]
            if tid in added and added[tid][0] != text:
                raise error(f"{path}: id {tid} is {text!r} here but {added[tid][0]!r} in {root / ADDED_TOKENS_JSON}")
            added[tid] = (text, bool(entry.get("special", True)))
        sources.append(str(path))
    return added, sources


def read_added_tokens(checkpoint_dir: str | Path) -> tuple[dict[str, int], str] | None:
    """The checkpoint's added tokens (text -> id) and the file(s) they came from; ``None`` without
    tokenizer files. ``tokenizer.json`` wins; else ``added_tokens.json`` and ``tokenizer_config.json``'s
    ``added_tokens_decoder`` (the layout of copies that ship ``vocab.json`` + ``merges.txt``)."""
    root = Path(checkpoint_dir)
    if (root / TOKENIZER_JSON).is_file():
        path = root / TOKENIZER_JSON
        entries = read_json_object(path).get("added_tokens", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: field 'added_tokens' must be a list")
        out: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise ConfigError(f"{path}: field 'added_tokens[{i}]' must be an object with a 'content' string")
            out[entry["content"]] = _token_id(entry.get("id"), f"{path}: field 'added_tokens[{i}].id'")
        return out, str(path)
    added, sources = read_added_files(root)
    out = {}
    for tid, (text, _) in sorted(added.items()):
        out.setdefault(text, tid)
    if not sources:
        return None
    return out, " and ".join(sources)


def resolve_special_ids(token: Callable[..., Any], added: tuple[dict[str, int], str] | None,
                        source: str) -> dict[str, int]:
    """``{"mask", "null", "end"}`` ids. ``token(*names)`` reads a config field (None when absent).

    Without tokenizer metadata (``added`` is None: a bare config dict) the documented Qwen2 ids of
    Fast-dLLM v2 apply; the tokenizer check catches a mismatch when the tokenizer loads.
    """
    end = token("end_token_id", "eos_token_id")
    end = DEFAULT_END_TOKEN_ID if end is None else end
    mask = token("mask_token_id")
    if mask is None:
        if added is None:
            mask = DEFAULT_MASK_TOKEN_ID
        elif MASK_TEXT in added[0]:
            mask = added[0][MASK_TEXT]
        else:
            raise ConfigError(f"{source}: no field 'mask_token_id', and {added[1]} has no {MASK_TEXT} added token; "
                              "set mask_token_id in config.json to the model's mask token")
    null = token("null_token_id")
    if null is None:
        if added is None:
            null = DEFAULT_NULL_TOKEN_ID if DEFAULT_NULL_TOKEN_ID not in (mask, end) else None
        else:
            null = next((added[0][t] for t in FILLER_TEXTS if added[0].get(t) not in (None, mask, end)), None)
        if null is None:
            where = source if added is None else f"{source} and {added[1]}"
            raise ConfigError(f"{where}: no field 'null_token_id' and no filler token ({' or '.join(FILLER_TEXTS)}) "
                              "distinct from mask and end; set null_token_id in config.json to an added special "
                              "token the model never writes in an answer")
    return {"mask": mask, "null": null, "end": end}

