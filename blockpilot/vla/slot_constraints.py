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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .slot_automata import DEAD, Automaton, ConstraintError, automaton_for, reserved_ids, token_texts
from .slots import SlotKind
from .tokenizer import TextCodec

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

__all__ = ["DEAD", "ConstraintError", "SlotConstraints", "build_constraints", "token_texts"]


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
    automata: tuple[Automaton, ...]
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
    reserved = reserved_ids(tokenizer)
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
    automata: list[Automaton] = []
    state_class: list[dict[int, int]] = []
    # Slots of one kind (the 12 flags, the 12 waypoint coordinates, ...) share one automaton and its classes.
    built: dict[SlotKind, tuple[Automaton, dict[int, int], int]] = {}
    for s, span in enumerate(spans):
        if span.kind not in built:
            auto = automaton_for(span.kind, tokenizer, texts, reserved, null_text, vocab_size, span.path)
            classes: dict[int, int] = {}
            any_row = np.zeros(vocab_size, dtype=np.bool_)
            for state in auto.states():
                row = auto.allowed(state)
                if not row.any():
                    raise ConstraintError(f"{span.path}: state {state} of its token automaton allows no token")
                any_row |= row
                classes[state] = class_of(row)
            built[span.kind] = (auto, classes, class_of(any_row))
        auto, classes, any_class = built[span.kind]
        slot_of[span.start: span.end] = s
        union[span.start: span.end] = any_class
        automata.append(auto)
        state_class.append(classes)
    table = np.stack(rows)
    table.flags.writeable = False
    return SlotConstraints(table, slot_of, tuple(span.start for span in spans), union, tuple(automata),
                           tuple(state_class))
