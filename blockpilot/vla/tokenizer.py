"""Thin wrapper around a Hugging Face ``tokenizer.json`` with the checkpoint's special token ids.

The special ids (mask, null, end, and the optional pad / image ones) come from the checkpoint
config, never from this module; loading checks that each exists in the file's vocabulary and
that mask, null and end are added tokens whose text encodes back to exactly that id, which
the scaffold and the answer parser rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import tokenizers

from ..atomic_io import atomic_path
from .config import ConfigError, SpecialTokens

TOKENIZER_FILE = "tokenizer.json"
_ATOMIC = ("mask", "null", "end")
_OPTIONAL = ("pad", "image", "vision_start", "vision_end")


# Token ids as the decoders hold them (numpy) or as plain lists.
TokenIdsLike = Sequence[int] | npt.NDArray[np.integer[Any]]


class TokenizerError(ConfigError):
    """A tokenizer file is missing or unreadable, or disagrees with the special token config."""


class TextCodec(Protocol):
    """The little the scaffold needs from a tokenizer."""

    @property
    def special(self) -> SpecialTokens: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: TokenIdsLike, skip_special_tokens: bool = False) -> str: ...


class Tokenizer:
    """Encode without adding special tokens, decode keeping or dropping them, look ids up."""

    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialTokens, source: str = "<in memory>") -> None:
        self._backend = backend
        self._special = special
        self.source = source
        self._check_special()

    @classmethod
    def from_file(cls, path: str | Path, special: SpecialTokens) -> Tokenizer:
        """Load ``tokenizer.json``, or a checkpoint directory holding one or else ``vocab.json`` +
        ``merges.txt`` + ``added_tokens.json`` / ``tokenizer_config.json`` (Qwen2's tokenizer)."""
        file = Path(path)
        if file.is_dir():
            if not (file / TOKENIZER_FILE).is_file() and (file / "vocab.json").is_file():
                from .bpe_files import qwen2_tokenizer_from_bpe_files

                try:
                    backend = qwen2_tokenizer_from_bpe_files(file)
                except ConfigError as exc:
                    raise TokenizerError(str(exc)) from exc
                return cls(backend, special, source=str(file / "vocab.json"))
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(f"{file}: no such tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception for any parse failure
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({exc})") from exc
        return cls(backend, special, source=str(file))

    @property
    def special(self) -> SpecialTokens:
        return self._special

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Ids in the file, added tokens included (a model's embedding table may be larger)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: TokenIdsLike, skip_special_tokens: bool = False) -> str:
        id_list = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in id_list if not 0 <= i < n]
        if bad:
            # The backend silently drops unknown ids, which would hide a model/tokenizer mismatch.
            raise ValueError(f"{self.source}: token ids {bad[:8]} are outside the vocabulary (size {n})")
        return str(self._backend.decode(id_list, skip_special_tokens=skip_special_tokens))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every added special token (chat markers, image tokens, mask, null, ...)."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: str) -> int | None:
        found = self._backend.token_to_id(token)
        return None if found is None else int(found)

    def id_to_token(self, token_id: int) -> str | None:
        found = self._backend.id_to_token(int(token_id))
        return None if found is None else str(found)

    def token_text(self, token_id: int) -> str:
        """The text one token stands for (special tokens included)."""
        return self.decode([token_id], skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory)."""
        file = Path(path)
        if file.is_dir() or not file.suffix:
            file.mkdir(parents=True, exist_ok=True)
            file = file / TOKENIZER_FILE
        with atomic_path(file) as tmp:
            self._backend.save(str(tmp))
        return file

    def _check_special(self) -> None:
        n = self.vocab_size
        for name in _ATOMIC + _OPTIONAL:
            token_id = getattr(self._special, name)
            if token_id is None:
                continue
            if not 0 <= token_id < n or self._backend.id_to_token(token_id) is None:
                raise TokenizerError(f"{self.source}: special token {name!r} has id {token_id}, which is not in "
                                     f"the vocabulary (size {n}); check the checkpoint's config")
        added = self._backend.get_added_tokens_decoder()
        for name in _ATOMIC:
            # The parser strips the null token's text from answers, so an ordinary word there
            # (an off-by-one id in a config, say) would silently corrupt them.
            token_id = getattr(self._special, name)
            text = self._backend.id_to_token(token_id)
            if token_id not in added or self.encode(self.token_text(token_id)) != [token_id]:
                raise TokenizerError(f"{self.source}: special token {name!r} (id {token_id}, {text!r}) is not an "
                                     "added token that encodes to itself; the config probably points at the "
                                     "wrong id")
