"""Typed value slots as allowed-token masks: which token ids each scaffold position may take.

Every value slot of a :class:`~blockpilot.vla.scaffold.Scaffold` gets a small token automaton, built once per
(scaffold, model vocabulary):

* a :class:`~blockpilot.vla.slots.FixedNumber` slot admits, at each step, the tokens whose text continues its
  fixed format (sign, integer digits, point, fraction digits) from the characters written so far; the filler
  (the scaffold's null token) only once the number is complete;
* a :class:`~blockpilot.vla.slots.Categorical` slot admits the next token of one of its options' canonical
  tokenizations (a token trie), the filler once an option is complete;
* a :class:`~blockpilot.vla.slots.FreeText` slot admits any ordinary token whose text holds no ``"``, ``\\`` or
  control character (nothing that ends or breaks the JSON string), plus the filler;

and after a filler only the filler (padding stays padding). Frozen template positions are unconstrained.
The distinct allowed sets are deduplicated into one boolean table ``(C, V)`` (``V`` = the model's vocabulary;
ids past the tokenizer's vocabulary are never allowed in a slot); row 0 allows everything. A decoder turns
the tokens before a position into that position's class id (:meth:`SlotConstraints.classes_after`), and the
backend applies ``table[class]`` to the logits on the device before top-1 and sampling.

Torch-free: the planner and the graph backends import it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .slots import Categorical, FixedNumber, FreeText, SchemaError, SlotKind
from .tokenizer import TextCodec

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

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


def _reserved_ids(tokenizer: TextCodec) -> set[int]:
    special = tokenizer.special
    ids = {special.mask, special.null, special.end} | set(getattr(tokenizer, "special_ids", ()))
    ids |= {i for i in (special.pad, special.image, special.vision_start, special.vision_end) if i is not None}
    return ids


class _Automaton:
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


class _NumberAutomaton(_Automaton):
    """State: characters of the fixed format written so far (``0 .. width``)."""

    def __init__(self, kind: FixedNumber, texts: Sequence[str], filler: int, vocab: int, path: str) -> None:
        super().__init__(filler, vocab)
        point = 1 + kind.int_digits
        self.classes = ["+-"] + ["0123456789"] * kind.int_digits
        if kind.frac_digits:
            self.classes += ["."] + ["0123456789"] * kind.frac_digits
        assert len(self.classes) == kind.width and (not kind.frac_digits or self.classes[point] == ".")
        self.width = kind.width
        charset = set("+-.0123456789")
        self.fits: dict[int, dict[int, int]] = {k: {} for k in range(self.width)}  # state -> token -> next state
        for tok, text in enumerate(texts):
            if tok == filler or not text or len(text) > self.width or not set(text) <= charset:
                continue
            for k in range(self.width - len(text) + 1):
                if all(ch in self.classes[k + i] for i, ch in enumerate(text)):
                    self.fits[k][tok] = k + len(text)
        for k in range(self.width):
            if not self.fits[k]:
                raise ConstraintError(f"{path}: no token of the tokenizer spells character {k} of the number "
                                      f"format (one of {self.classes[k]!r})")

    def states(self) -> list[int]:
        return [*range(self.width + 1), PAD]

    def allowed(self, state: int) -> BoolArray:
        if state == PAD or state == self.width:
            return self.row([], filler=True)
        return self.row(list(self.fits[state]), filler=False)

    def advance(self, state: int, token: int) -> int:
        if state == PAD or state == self.width:
            return PAD if token == self.filler else DEAD
        return self.fits[state].get(token, DEAD)


class _TrieAutomaton(_Automaton):
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


class _TextAutomaton(_Automaton):
    """State 0: text so far (any ordinary token, or the filler); then PAD."""

    def __init__(self, texts: Sequence[str], reserved: set[int], null_text: str, filler: int, vocab: int) -> None:
        super().__init__(filler, vocab)
        ok = [i for i, text in enumerate(texts) if i not in reserved and text and null_text not in text
              and '"' not in text and "\\" not in text and all(ord(ch) >= 0x20 for ch in text)]
        self._text = self.row(ok, filler=True)
        self._ok = frozenset(ok)

    def states(self) -> list[int]:
        return [0, PAD]

    def allowed(self, state: int) -> BoolArray:
        return self.row([], filler=True) if state == PAD else self._text

    def advance(self, state: int, token: int) -> int:
        if token == self.filler:
            return PAD
        return 0 if state == 0 and token in self._ok else DEAD


def _automaton(kind: SlotKind, tokenizer: TextCodec, texts: Sequence[str], reserved: set[int], null_text: str,
               vocab: int, path: str) -> _Automaton:
    filler = tokenizer.special.null
    if isinstance(kind, FixedNumber):
        return _NumberAutomaton(kind, texts, filler, vocab, path)
    if isinstance(kind, Categorical):
        return _TrieAutomaton(kind, tokenizer, filler, vocab, path)
    if isinstance(kind, FreeText):
        return _TextAutomaton(texts, reserved, null_text, filler, vocab)
    raise ConstraintError(f"{path}: no token constraint for slot kind {type(kind).__name__}")


class _SpanView(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...

    @property
    def kind(self) -> SlotKind: ...


class ScaffoldView(Protocol):
    """What the constraints read of a :class:`~blockpilot.vla.scaffold.Scaffold`."""

    @property
    def token_ids(self) -> IntArray: ...

    @property
    def tokenizer(self) -> TextCodec: ...

    @property
    def null_text(self) -> str: ...

    @property
    def slots(self) -> Sequence[_SpanView]: ...


@dataclass(frozen=True, eq=False)
class SlotConstraints:
    """The allowed-token table of one scaffold and the per-slot automata that pick its rows.

    ``table`` ``(C, V)`` bool is the same array for every plan (a backend uploads it once); row 0 allows every
    token. ``slot_of`` ``(n,)`` gives each answer position's slot index (-1: frozen); ``slot_start`` each
    slot's first position; ``union`` ``(n + 1,)`` each position's slot-wide class (what any state of its slot
    may allow: the bidirectional draft's constraint), 0 for frozen positions and past the end.
    """

    table: BoolArray
    slot_of: IntArray
    slot_start: tuple[int, ...]
    union: IntArray
    automata: tuple[_Automaton, ...]
    state_class: tuple[dict[int, int], ...]

    @property
    def num_classes(self) -> int:
        return int(self.table.shape[0])

    def __len__(self) -> int:
        return int(self.slot_of.shape[0])

    def class_at(self, tokens: Sequence[int] | IntArray, position: int) -> int:
        """Class of answer ``position`` given the answer tokens before it (``tokens[:position]``)."""
        if position >= len(self) or self.slot_of[position] < 0:
            return 0
        s = int(self.slot_of[position])
        auto, state = self.automata[s], self.automata[s].start
        for p in range(self.slot_start[s], position):
            state = auto.advance(state, int(tokens[p]))
            if state == DEAD:
                return 0
        return self.state_class[s][state]

    def classes_after(self, tokens: IntArray, begin: int) -> IntArray:
        """``(rows, m - begin)`` for ``tokens`` ``(rows, m)``: column ``j - begin`` is the class of answer position
        ``j + 1`` given ``tokens[:, :j + 1]``, i.e. the constraint on what the forward at ``j`` predicts."""
        arr = np.asarray(tokens, dtype=np.int64)
        rows, m = arr.shape
        out = np.zeros((rows, m - begin), dtype=np.int64)
        for r in range(rows):
            state, slot = 0, -1
            for j in range(begin, m):
                p = j + 1
                s = int(self.slot_of[p]) if p < len(self) else -1
                if s < 0:
                    continue
                auto = self.automata[s]
                if s != slot:  # entering (or resuming in) a slot: replay its tokens before p
                    slot, state = s, auto.start
                    for q in range(self.slot_start[s], p):
                        state = auto.advance(state, int(arr[r, q])) if state != DEAD else DEAD
                else:
                    state = auto.advance(state, int(arr[r, j])) if state != DEAD else DEAD
                out[r, j - begin] = 0 if state == DEAD else self.state_class[s][state]
        return out

    def draft_classes(self, begin: int, end: int) -> IntArray:
        """``(end - begin,)``: the slot-wide class of answer positions ``begin + 1 .. end``."""
        return self.union[begin + 1: end + 1].copy()

    def allows(self, position_class: int, token: int) -> bool:
        return bool(self.table[position_class, token])


def build_constraints(scaffold: ScaffoldView, vocab_size: int) -> SlotConstraints:
    """The :class:`SlotConstraints` of ``scaffold`` (a :class:`~blockpilot.vla.scaffold.Scaffold`) for a model
    whose logits have ``vocab_size`` entries (at least the tokenizer's). Raises :class:`ConstraintError`."""
    tokenizer = scaffold.tokenizer
    n_tok = tokenizer.vocab_size
    if vocab_size < n_tok:
        raise ConstraintError(f"the model's vocabulary ({vocab_size}) is smaller than the tokenizer's ({n_tok})")
    texts = token_texts(tokenizer)
    reserved = _reserved_ids(tokenizer)
    null_text = scaffold.null_text
    spans = scaffold.slots
    n = len(scaffold.token_ids)
    rows: list[BoolArray] = [np.ones(vocab_size, dtype=np.bool_)]
    index: dict[bytes, int] = {np.packbits(rows[0]).tobytes(): 0}

    def class_of(row: BoolArray) -> int:
        key = np.packbits(row).tobytes()
        if key not in index:
            index[key] = len(rows)
            rows.append(row)
        return index[key]

    slot_of = np.full(n, -1, dtype=np.int64)
    union = np.zeros(n + 1, dtype=np.int64)
    automata: list[_Automaton] = []
    state_class: list[dict[int, int]] = []
    for s, span in enumerate(spans):
        auto = _automaton(span.kind, tokenizer, texts, reserved, null_text, vocab_size, span.path)
        classes: dict[int, int] = {}
        any_row = np.zeros(vocab_size, dtype=np.bool_)
        for state in auto.states():
            row = auto.allowed(state)
            if not row.any():
                raise ConstraintError(f"{span.path}: state {state} of its token automaton allows no token")
            any_row |= row
            classes[state] = class_of(row)
        slot_of[span.start: span.end] = s
        union[span.start: span.end] = class_of(any_row)
        automata.append(auto)
        state_class.append(classes)
    table = np.stack(rows)
    table.flags.writeable = False
    return SlotConstraints(table, slot_of, tuple(span.start for span in spans), union, tuple(automata),
                           tuple(state_class))
