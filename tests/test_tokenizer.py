"""Tokenizer wrapper and the reference BPE: determinism, special ids, Qwen2-like splitting, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers

from blockpilot.vla.config import ConfigError, SpecialTokens
from blockpilot.vla.reference_tokenizer import (
    END_TEXT,
    IMAGE_TEXT,
    MASK_TEXT,
    NULL_TEXT,
    PAD_TEXT,
    QWEN2_LIKE_SPLIT,
    SPECIAL_TEXTS,
    VISION_END_TEXT,
    VISION_START_TEXT,
    build_reference_tokenizer,
)
from blockpilot.vla.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, SpecialTokens, Path]:
    out = tmp_path_factory.mktemp("reftok")
    tok, special = build_reference_tokenizer(out)
    return tok, special, out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reference_build_is_deterministic_in_process(built, tmp_path: Path) -> None:
    _, special, out = built
    _, special_again = build_reference_tokenizer(tmp_path)
    assert special_again == special
    assert _sha(tmp_path / TOKENIZER_FILE) == _sha(out / TOKENIZER_FILE)


def test_reference_build_is_deterministic_across_processes(built, tmp_path: Path) -> None:
    # Rust hash maps are seeded per process, so a second interpreter is the real check.
    _, _, out = built
    code = ("import sys; from blockpilot.vla.reference_tokenizer import build_reference_tokenizer; "
            "build_reference_tokenizer(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert _sha(tmp_path / TOKENIZER_FILE) == _sha(out / TOKENIZER_FILE)


def test_vocabulary_is_small(built) -> None:
    tok, _, _ = built
    assert 512 <= tok.vocab_size <= 1024


def test_special_ids_name_their_tokens(built) -> None:
    tok, special, _ = built
    expected = {"mask": MASK_TEXT, "null": NULL_TEXT, "end": END_TEXT, "pad": PAD_TEXT, "image": IMAGE_TEXT,
                "vision_start": VISION_START_TEXT, "vision_end": VISION_END_TEXT}
    for name, text in expected.items():
        token_id = getattr(special, name)
        assert tok.token_text(token_id) == text
        assert tok.token_to_id(text) == token_id
        assert tok.encode(text) == [token_id]
    assert len({tok.token_to_id(t) for t in SPECIAL_TEXTS}) == len(SPECIAL_TEXTS)


def test_encode_adds_no_special_tokens(built) -> None:
    tok, special, _ = built
    assert tok.encode("") == []
    ids = tok.encode("the ego vehicle slows down")
    assert {special.mask, special.null, special.end, special.pad}.isdisjoint(ids)


def test_decode_keeps_or_drops_special_tokens(built) -> None:
    tok, special, _ = built
    ids = [*tok.encode("stop"), special.null, special.null, *tok.encode("here"), special.end]
    assert tok.decode(ids) == f"stop{NULL_TEXT}{NULL_TEXT}here{END_TEXT}"
    assert tok.decode(ids, skip_special_tokens=True) == "stophere"


def test_digits_are_single_tokens(built) -> None:
    tok, _, _ = built
    for number in ("+14.70", "-00.04", "+123.45"):
        ids = tok.encode(number)
        assert len(ids) == len(number)
        assert [tok.decode([i]) for i in ids] == list(number)
    assert len(tok.encode("9876543210")) == 10


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_splits_like_qwen2(text: str) -> None:
    from transformers.models.qwen2 import tokenization_qwen2 as qwen2
    ours = pre_tokenizers.Split(Regex(QWEN2_LIKE_SPLIT), behavior="isolated")
    theirs = pre_tokenizers.Split(Regex(qwen2.PRETOKENIZE_REGEX), behavior="isolated")
    assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_text_round_trips_up_to_nfc(built, text: str) -> None:
    tok, _, _ = built
    if any(t in text for t in SPECIAL_TEXTS):
        return
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_loads_from_directory_or_file(built) -> None:
    tok, special, out = built
    from_dir = Tokenizer.from_file(out, special)
    from_file = Tokenizer.from_file(out / TOKENIZER_FILE, special)
    text = '{"trajectory":[[+14.70,-00.04]]} crossing pedestrian'
    assert from_dir.encode(text) == from_file.encode(text) == tok.encode(text)
    assert from_dir.source == str(out / TOKENIZER_FILE)


def test_special_id_outside_vocabulary_names_file_and_token(built) -> None:
    _, special, out = built
    wrong = SpecialTokens(mask=special.mask, null=special.null, end=special.end, image=5000)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*'image'.*5000"):
        Tokenizer.from_file(out, wrong)
    # The Qwen2 defaults do not fit the reference vocabulary: the error must say so, not crash later.
    with pytest.raises(TokenizerError, match=r"'mask' has id 151665"):
        Tokenizer.from_file(out, SpecialTokens())


def test_special_id_on_an_ordinary_token_is_rejected(built) -> None:
    tok, special, out = built
    ordinary = tok.encode("pedestrian")[0]
    wrong = SpecialTokens(mask=special.mask, null=ordinary, end=special.end)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*'null'"):
        Tokenizer.from_file(out, wrong)
    assert issubclass(TokenizerError, ConfigError)


def test_missing_or_broken_file(tmp_path: Path, built) -> None:
    _, special, _ = built
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.from_file(tmp_path, special)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(TokenizerError, match=r"not a readable tokenizer\.json"):
        Tokenizer.from_file(tmp_path, special)


def test_decode_rejects_ids_outside_vocabulary(built) -> None:
    tok, _, _ = built
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
