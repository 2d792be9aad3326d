"""One token automaton per value-slot kind: which token ids a slot position may take, given the slot's tokens so far.

* number (:class:`~blockpilot.vla.slots.FixedNumber`): the tokens whose text continues the fixed format (sign,
  integer digits, point, fraction digits) from the characters written so far and keeps the value inside the
  slot's range (a bounded number of a JSON Schema, :class:`~blockpilot.vla.json_parts.BoundedNumber`): a digit
  DP over the magnitude's digits, whose state is the character count, the sign and whether the digits so far
  still equal the lowest / highest allowed magnitude's; the filler (null token) once the number is complete;
* enum (:class:`~blockpilot.vla.slots.Categorical`): the next token of one of its options' canonical
  tokenizations (a token trie); the filler once an option is complete;
* free text (:class:`~blockpilot.vla.slots.FreeText`): any ordinary token without ``"``, ``\\`` or a control
  character; with a character budget (:class:`~blockpilot.vla.json_parts.BoundedText` ``maxLength`` /
  ``minLength``) only tokens that fit the characters left, and the filler once the minimum is written;

after a filler only the filler. Subclasses of the three kinds are covered (dispatch is by ``isinstance``).
Automata are built once per (slot kind, tokenizer, vocabulary) and shared by every slot of that kind.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from decimal import Decimal

import numpy as np
import numpy.typing as npt

from .slots import Categorical, FixedNumber, FreeText, SchemaError, SlotKind
from .tokenizer import TextCodec

BoolArray = npt.NDArray[np.bool_]

DEAD = -1  # a token the state did not allow: the position is discarded by the decoder, any class will do
PAD = -2  # after a filler


class ConstraintError(SchemaError):
    """A slot cannot be constrained with this tokenizer (no token spells a character its format needs, ...)."""


_TEXTS: weakref.WeakKeyDictionary[object, tuple[str, ...]] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: TextCodec) -> tuple[str, ...]:
    """The text of every token id of ``tokenizer`` on its own (special tokens included), cached per tokenizer."""
    try:
        return _TEXTS[tokenizer]
    except (KeyError, TypeError):
        pass
    n = tokenizer.vocab_size
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        texts = tuple(str(t) for t in backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False))
    else:
        texts = tuple(tokenizer.decode([i], skip_special_tokens=False) for i in range(n))
    with contextlib.suppress(TypeError):  # not weak-referenceable: no cache
        _TEXTS[tokenizer] = texts
    return texts


def reserved_ids(tokenizer: TextCodec) -> set[int]:
    special = tokenizer.special
    ids = {special.mask, special.null, special.end} | set(getattr(tokenizer, "special_ids", ()))
    ids |= {i for i in (special.pad, special.image, special.vision_start, special.vision_end) if i is not None}
    return ids


class Automaton:
    """One slot's automaton: ``start`` state, ``advance(state, token)``, ``allowed(state)`` rows."""

    start: int = 0

    def __init__(self, filler: int, vocab: int) -> None:
        self.filler = filler
        self.vocab = vocab

    def row(self, ids: Sequence[int] | npt.NDArray[np.int64], filler: bool) -> BoolArray:
        out = np.zeros(self.vocab, dtype=np.bool_)
        out[np.asarray(list(ids), dtype=np.int64)] = True
        if filler:
            out[self.filler] = True
        return out

    def states(self) -> list[int]:
        raise NotImplementedError

    def allowed(self, state: int) -> BoolArray:
        raise NotImplementedError

    def advance(self, state: int, token: int) -> int:
        raise NotImplementedError


def _magnitude_units(kind: FixedNumber) -> tuple[int, int]:
    """The lowest and highest value the slot may hold, in units of its last digit (``10**-frac_digits``)."""
    scale = Decimal(10) ** kind.frac_digits
    top = 10 ** (kind.int_digits + kind.frac_digits) - 1
    lo, hi = -top, top
    minimum, maximum = getattr(kind, "minimum", -math.inf), getattr(kind, "maximum", math.inf)
    if math.isfinite(minimum):
        exact = Decimal(repr(float(minimum))) * scale
        lo = max(lo, math.floor(exact) + 1 if getattr(kind, "exclusive_minimum", False) and exact == exact.to_integral()
                 else math.ceil(exact))
    if math.isfinite(maximum):
        exact = Decimal(repr(float(maximum))) * scale
        hi = min(hi, math.ceil(exact) - 1 if getattr(kind, "exclusive_maximum", False) and exact == exact.to_integral()
                 else math.floor(exact))
    return lo, hi


class _NumberAutomaton(Automaton):
    """A digit DP over the fixed format. A state is ``(chars written, sign, equal to the lowest magnitude so far,
    equal to the highest so far)``; after the sign the magnitude must lie in that sign's interval."""

    def __init__(self, kind: FixedNumber, texts: Sequence[str], filler: int, vocab: int, path: str) -> None:
        super().__init__(filler, vocab)
        self.width = kind.width
        self.point = 1 + kind.int_digits if kind.frac_digits else -1
        digits = kind.int_digits + kind.frac_digits
        lo, hi = _magnitude_units(kind)
        # The magnitude interval (as zero-padded digit strings) after each sign; "-" needs a value below zero
        # (or zero itself, which parses as -0.0 and lies in range where zero does).
        self.bounds: dict[str, tuple[str, str]] = {}
        if hi >= max(lo, 0):
            self.bounds["+"] = (f"{max(lo, 0):0{digits}d}", f"{hi:0{digits}d}")
        if lo <= min(hi, 0):
            self.bounds["-"] = (f"{max(-hi, 0):0{digits}d}", f"{-lo:0{digits}d}")
        if not self.bounds:
            raise ConstraintError(f"{path}: no value of the format {kind.width} characters wide lies in its range")
        self.keys: list[tuple[int, str, bool, bool]] = [(0, "", True, True)]
        self.ids: dict[tuple[int, str, bool, bool], int] = {self.keys[0]: 0}
        charset = set("+-.0123456789")
        candidates = [(tok, text) for tok, text in enumerate(texts)
                      if tok != filler and text and len(text) <= self.width and set(text) <= charset]
        self.fits: list[dict[int, int]] = []
        at = 0
        while at < len(self.keys):  # breadth first over the reachable states
            fits: dict[int, int] = {}
            if self.keys[at][0] < self.width:
                for tok, text in candidates:
                    key: tuple[int, str, bool, bool] | None = self.keys[at]
                    for ch in text:
                        key = self._step(key, ch) if key is not None else None
                    if key is not None:
                        fits[tok] = self.ids.setdefault(key, len(self.keys))
                        if fits[tok] == len(self.keys):
                            self.keys.append(key)
                if not fits:
                    raise ConstraintError(f"{path}: no token of the tokenizer spells character {self.keys[at][0]} of "
                                          "the number format within its range")
            self.fits.append(fits)
            at += 1

    def _step(self, key: tuple[int, str, bool, bool], ch: str) -> tuple[int, str, bool, bool] | None:
        k, sign, tight_lo, tight_hi = key
        if k >= self.width:
            return None
        if k == 0:
            return (1, ch, True, True) if ch in self.bounds else None
        if k == self.point:
            return (k + 1, sign, tight_lo, tight_hi) if ch == "." else None
        if not "0" <= ch <= "9":
            return None
        i = k - 1 - int(0 < self.point < k)  # index among the magnitude's digits
        low, high = self.bounds[sign]
        if (tight_lo and ch < low[i]) or (tight_hi and ch > high[i]):
            return None
        return (k + 1, sign, tight_lo and ch == low[i], tight_hi and ch == high[i])

    def states(self) -> list[int]:
        return [*range(len(self.keys)), PAD]

    def allowed(self, state: int) -> BoolArray:
        if state == PAD or self.keys[state][0] == self.width:
            return self.row([], filler=True)
        return self.row(list(self.fits[state]), filler=False)

    def advance(self, state: int, token: int) -> int:
        if state == PAD or self.keys[state][0] == self.width:
            return PAD if token == self.filler else DEAD
        return self.fits[state].get(token, DEAD)


class _TrieAutomaton(Automaton):
    """State: a node of the trie of the options' token sequences (0 the root)."""

    def __init__(self, kind: Categorical, tokenizer: TextCodec, filler: int, vocab: int, path: str) -> None:
        super().__init__(filler, vocab)
        self.children: list[dict[int, int]] = [{}]
        self.complete: list[bool] = [False]
        for option in kind.options:
            ids = tokenizer.encode(option)
            if filler in ids:
                raise ConstraintError(f"{path}: option {option!r} tokenizes with the filler token {filler}")
            node = 0
            for tok in ids:
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][tok] = nxt
                    self.children.append({})
                    self.complete.append(False)
                node = nxt
            self.complete[node] = True

    def states(self) -> list[int]:
        return [*range(len(self.children)), PAD]

    def allowed(self, state: int) -> BoolArray:
        if state == PAD:
            return self.row([], filler=True)
        return self.row(list(self.children[state]), filler=self.complete[state])

    def advance(self, state: int, token: int) -> int:
        if state == PAD:
            return PAD if token == self.filler else DEAD
        if token == self.filler:
            return PAD if self.complete[state] else DEAD
        return self.children[state].get(token, DEAD)


class _TextAutomaton(Automaton):
    """State: characters written so far (``0 ..``; one state when there is no character budget), then PAD."""

    def __init__(self, kind: FreeText, texts: Sequence[str], reserved: set[int], null_text: str, filler: int,
                 vocab: int) -> None:
        super().__init__(filler, vocab)
        ok = [i for i, text in enumerate(texts) if i not in reserved and text and null_text not in text
              and '"' not in text and "\\" not in text and all(ord(ch) >= 0x20 for ch in text)]
        self.max_chars: int | None = getattr(kind, "max_length", None)
        self.min_chars: int = getattr(kind, "min_length", 0)
        self._refused = int(np.iinfo(np.int32).max)  # the length of a token no text slot takes
        self._lengths = np.full(vocab, self._refused, dtype=np.int64)
        self._lengths[np.asarray(ok, dtype=np.int64)] = [len(texts[i]) for i in ok]
        self._text = self.row(ok, filler=self.min_chars == 0)

    def states(self) -> list[int]:
        return [*range((self.max_chars or 0) + 1), PAD]

    def allowed(self, state: int) -> BoolArray:
        if state == PAD:
            return self.row([], filler=True)
        if self.max_chars is None:
            return self._text
        out = self._lengths <= self.max_chars - state  # a character may take a token of its own
        out[self.filler] = state >= self.min_chars
        return out

    def advance(self, state: int, token: int) -> int:
        if state == PAD or token == self.filler:
            return PAD if state == PAD or state >= self.min_chars else DEAD
        size = int(self._lengths[token])
        if self.max_chars is None:
            return 0 if size < self._refused else DEAD
        return state + size if state + size <= self.max_chars else DEAD


def automaton_for(kind: SlotKind, tokenizer: TextCodec, texts: Sequence[str], reserved: set[int], null_text: str,
                  vocab: int, path: str) -> Automaton:
    filler = tokenizer.special.null
    if isinstance(kind, FixedNumber):
        return _NumberAutomaton(kind, texts, filler, vocab, path)
    if isinstance(kind, Categorical):
        return _TrieAutomaton(kind, tokenizer, filler, vocab, path)
    if isinstance(kind, FreeText):
        return _TextAutomaton(kind, texts, reserved, null_text, filler, vocab)
    raise ConstraintError(f"{path}: no token constraint for slot kind {type(kind).__name__}")
