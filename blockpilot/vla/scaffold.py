"""Token scaffold of an answer layout: frozen structure tokens around fixed-length value slots.

Structure segments and slot values are tokenized separately and concatenated, so every slot
has a fixed token count at a known position whatever its value. A decoder starts from
``token_ids`` (slots hold the mask token) and only ever writes where ``frozen`` is false; a
value shorter than its slot is padded with the null token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic

import numpy as np
import numpy.typing as npt

from .answer_parser import PlanParseError, parse_sections
from .plans import PlanSchema, PlanT
from .slots import Categorical, FixedNumber, FreeText, SchemaError, SlotKind, SlotValueError, Structure
from .tokenizer import TextCodec, TokenIdsLike

TokenIds = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SlotSpan:
    """Token positions ``[start, start + length)`` of one value slot."""

    path: str
    start: int
    length: int
    kind: SlotKind

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class SectionSpan:
    """Token positions ``[start, end)`` of one top-level section, in causal order."""

    key: str
    start: int
    end: int


def _slot_length(kind: SlotKind, tokenizer: TextCodec) -> int:
    if isinstance(kind, FreeText):
        return kind.max_tokens
    if isinstance(kind, Categorical):
        return max(len(tokenizer.encode(option)) for option in kind.options)
    if isinstance(kind, FixedNumber):
        # A byte-level token holds at least one byte, so the character width bounds the count;
        # the probes cover tokenizers that add a prefix token to some spellings.
        fraction = "." if kind.frac_digits else ""
        probes = [sign + d * kind.int_digits + fraction + d * kind.frac_digits for sign in "+-" for d in "0123456789"]
        return max(kind.width, *(len(tokenizer.encode(p)) for p in probes))
    raise SchemaError(f"no scaffold slot length for {type(kind).__name__}")


@dataclass(frozen=True, eq=False)
class Scaffold(Generic[PlanT]):
    """A schema's answer template in tokens; build it with :func:`build_scaffold`."""

    schema: PlanSchema[PlanT]
    tokenizer: TextCodec
    token_ids: TokenIds  # slots filled with the mask token
    frozen: npt.NDArray[np.bool_]  # True where the template fixes the token
    slots: tuple[SlotSpan, ...]
    sections: tuple[SectionSpan, ...]
    null_text: str

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def slot(self, path: str) -> SlotSpan:
        for span in self.slots:
            if span.path == path:
                return span
        raise KeyError(f"no slot {path!r} in the scaffold")

    def describe(self) -> str:
        """The template as text: frozen structure decoded, each slot shown as ``<path:length>``."""
        out: list[str] = []
        pos = 0
        for span in (*self.slots, None):
            end = span.start if span is not None else len(self)
            out.append(self.tokenizer.decode(self.token_ids[pos:end]))
            if span is not None:
                out.append(f"<{span.path}:{span.length}>")
                pos = span.end
        return "".join(out)

    def encode_sections(self, values: Mapping[str, object]) -> TokenIds:
        """Full token sequence of section-keyed values; raises :class:`SchemaError` if one does not fit."""
        ids = self.token_ids.copy()
        texts = self.schema.layout.format_slots(values)
        special = self.tokenizer.special
        for span, text in zip(self.slots, texts, strict=True):
            value_ids = self.tokenizer.encode(text)
            # Any special token inside a value would be stripped or misread by the parser.
            reserved = {special.mask, special.null, special.end} | set(getattr(self.tokenizer, "special_ids", ()))
            clash = reserved & set(value_ids)
            if clash:
                raise SchemaError(f"{span.path}: value {text[:40]!r} contains special token ids {sorted(clash)}")
            if len(value_ids) > span.length:
                if not isinstance(span.kind, FreeText):
                    raise SchemaError(f"{span.path}: {text!r} takes {len(value_ids)} tokens, the slot holds "
                                      f"{span.length}")
                value_ids = self._truncate(value_ids, span)
            ids[span.start: span.start + len(value_ids)] = value_ids
            ids[span.start + len(value_ids): span.end] = special.null
        return ids

    def encode_plan(self, plan: PlanT) -> TokenIds:
        """Full token sequence of ``plan`` (slots padded with null; long free text truncated)."""
        return self.encode_sections(self.schema.sections_from_plan(plan))

    def read_slots(self, ids: TokenIdsLike) -> dict[str, str]:
        """Each slot's text in a token sequence, null padding removed (other special tokens kept)."""
        seq = self._check_shape(ids)
        null = self.tokenizer.special.null
        return {span.path: self.tokenizer.decode([int(t) for t in seq[span.start: span.end] if t != null])
                for span in self.slots}

    def decode_sections(self, ids: TokenIdsLike) -> dict[str, object]:
        """Section-keyed values of a filled token sequence; raises :class:`PlanParseError`.

        Offsets in the error count characters of the decoded sequence (null tokens included).
        """
        seq = self._check_shape(ids)
        outside = np.flatnonzero((seq < 0) | (seq >= self.tokenizer.vocab_size))
        if outside.size:
            pos = int(outside[0])
            where = next((s.path for s in self.slots if s.start <= pos < s.end), None) \
                or next(s.key for s in self.sections if s.start <= pos < s.end)
            offset = len(self.tokenizer.decode(seq[:pos]))
            raise PlanParseError(where, offset, f"token id {int(seq[pos])} at position {pos} is outside the "
                                                f"tokenizer's vocabulary")
        text = self.tokenizer.decode(seq, skip_special_tokens=False)
        return parse_sections(text, self.schema.layout, null_text=self.null_text)

    def decode_plan(self, ids: TokenIdsLike) -> PlanT:
        """The typed plan in a filled token sequence; raises :class:`PlanParseError`."""
        return self.schema.plan_from_sections(self.decode_sections(ids))

    def _check_shape(self, ids: TokenIdsLike) -> TokenIds:
        seq = np.asarray(ids, dtype=np.int64)
        if seq.shape != self.token_ids.shape:
            raise ValueError(f"expected {len(self)} token ids for this scaffold, got shape {seq.shape}")
        return seq

    def _truncate(self, value_ids: list[int], span: SlotSpan) -> list[int]:
        # Cut at the longest token prefix that decodes to a clean prefix of the value: no split
        # multi-byte character (it would decode to U+FFFD) and no half escape sequence.
        full = self.tokenizer.decode(value_ids)
        for k in range(span.length, 0, -1):
            piece = self.tokenizer.decode(value_ids[:k])
            if not full.startswith(piece):
                continue
            try:
                span.kind.parse_value(piece)
            except SlotValueError:
                continue
            return value_ids[:k]
        return []


def build_scaffold(schema: PlanSchema[PlanT], tokenizer: TextCodec) -> Scaffold[PlanT]:
    """Tokenize ``schema``'s template once: structure frozen, slots masked, spans recorded."""
    special = tokenizer.special
    null_text = tokenizer.decode([special.null], skip_special_tokens=False)
    if not null_text:
        raise SchemaError(f"the null token (id {special.null}) decodes to empty text; the parser cannot strip it")
    layout = schema.layout
    ids: list[int] = []
    frozen: list[bool] = []
    slots: list[SlotSpan] = []
    sections: list[SectionSpan] = []
    for (first, last), section in zip(layout.section_items, layout.sections, strict=True):
        start = len(ids)
        for item in layout.template[first:last]:
            if isinstance(item, Structure):
                if null_text in item.text:
                    raise SchemaError(f"{section.key}: structure {item.text!r} contains the null token's text")
                piece = tokenizer.encode(item.text)
                ids += piece
                frozen += [True] * len(piece)
            else:
                if isinstance(item.kind, Categorical) and any(null_text in o for o in item.kind.options):
                    raise SchemaError(f"{item.path}: an option contains the null token's text {null_text!r}")
                length = _slot_length(item.kind, tokenizer)
                slots.append(SlotSpan(item.path, len(ids), length, item.kind))
                ids += [special.mask] * length
                frozen += [False] * length
        sections.append(SectionSpan(section.key, start, len(ids)))
    token_ids = np.array(ids, dtype=np.int64)
    frozen_arr = np.array(frozen, dtype=np.bool_)
    token_ids.flags.writeable = False
    frozen_arr.flags.writeable = False
    return Scaffold(schema, tokenizer, token_ids, frozen_arr, tuple(slots), tuple(sections), null_text)
