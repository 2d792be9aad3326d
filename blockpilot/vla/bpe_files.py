"""A Qwen2 tokenizer from ``vocab.json`` + ``merges.txt`` + added tokens, for copies without ``tokenizer.json``.

Some published copies of Fast-dLLM v2 / Qwen2.5 checkpoints ship the slow-tokenizer files only. The
tokenizer built here is the one ``tokenizer.json`` describes for Qwen2: NFC normalization, the Qwen2
split regex then byte-level mapping (no prefix space), byte-level BPE without unknown token, added
tokens at the ids the files give, matched before normalization. Ids come out identical to the
``tokenizer.json`` of the same vocabulary and to transformers' Qwen2 tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from .config import ConfigError, read_json_object
from .special_tokens import MERGES_TXT, VOCAB_JSON, read_added_files

# Qwen2's pre-tokenizer split: contractions, words with one leading non-letter, single digits,
# punctuation runs, newline runs, trailing whitespace, other whitespace.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")


class BpeFilesError(ConfigError):
    """``vocab.json`` / ``merges.txt`` / added-token files are missing, unreadable or inconsistent."""


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = read_json_object(path, BpeFilesError)
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise BpeFilesError(f"{path}: entry {bad[0]!r} is not a non-negative int id")
    if len(set(vocab.values())) != len(vocab):
        raise BpeFilesError(f"{path}: two entries share an id")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BpeFilesError(f"{path}: not readable ({exc})") from exc
    merges = []
    for n, line in enumerate(lines, start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise BpeFilesError(f"{path}: line {n} is not two tokens separated by one space: {line!r}")
        missing = [p for p in (*parts, parts[0] + parts[1]) if p not in vocab]
        if missing:
            raise BpeFilesError(f"{path}: line {n} merges into or from {missing[0]!r}, which "
                                f"{path.with_name(VOCAB_JSON)} lacks")
        merges.append((parts[0], parts[1]))
    return merges


def qwen2_tokenizer_from_bpe_files(root: str | Path) -> tokenizers.Tokenizer:
    """The Qwen2 tokenizer of ``root/vocab.json`` + ``root/merges.txt`` and the added tokens beside them."""
    root = Path(root)
    for name in (VOCAB_JSON, MERGES_TXT):
        if not (root / name).is_file():
            raise BpeFilesError(f"{root / name}: missing (a checkpoint needs tokenizer.json, or vocab.json + "
                                "merges.txt + added_tokens.json)")
    vocab = _read_vocab(root / VOCAB_JSON)
    merges = _read_merges(root / MERGES_TXT, vocab)
    added = read_added_files(root, BpeFilesError)[0]
    taken = set(vocab.values())
    clash = sorted(i for i, (text, _) in added.items() if i in taken and vocab.get(text) != i)
    if clash:
        raise BpeFilesError(f"{root}: added token id {clash[0]} ({added[clash[0]][0]!r}) is also an id in "
                            f"{root / VOCAB_JSON}")
    # Added tokens take ids after the vocabulary in order: they must continue it without gaps.
    expected = range(len(vocab), len(vocab) + len(added))
    if max(taken, default=-1) != len(vocab) - 1 or sorted(added) != list(expected):
        raise BpeFilesError(f"{root}: {VOCAB_JSON} must hold ids 0..{len(vocab) - 1} and the added tokens ids "
                            f"{len(vocab)}.. without gaps; got added ids {sorted(added)[:3]}..")
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                              fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    for tid in sorted(added):
        text, special = added[tid]
        token = AddedToken(text, lstrip=False, rstrip=False, single_word=False, normalized=False, special=special)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(text) != tid:
            raise BpeFilesError(f"{root}: added token {text!r} should have id {tid} but took "
                                f"{backend.token_to_id(text)}")
    return backend
