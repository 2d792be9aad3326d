"""Strict parser from generated answer text to a typed plan.

The text must follow the layout exactly: keys in order, no whitespace, values in their
vocabularies, numbers in their fixed-width format, the exact waypoint count. Padding (the null
token's text) is removed first, wherever it sits. Anything else raises :class:`PlanParseError`
naming the field and the character offset in the text as given; no other exception escapes for
malformed text, so a planner node can reject a bad answer and keep running.
"""

from __future__ import annotations

from bisect import bisect_right

from ..errors import BlockpilotError
from .plans import PlanSchema, PlanT
from .schema import SchemaLayout
from .slots import Slot, SlotValueError


class PlanParseError(BlockpilotError, ValueError):
    """Generated text is not a valid answer.

    ``field`` is a slot path (``trajectory.3.1``), a section key, or ``answer`` for the text as a
    whole; ``offset`` is a character offset into the text that was parsed.
    """

    def __init__(self, field: str, offset: int, reason: str) -> None:
        super().__init__(f"{field} at offset {offset}: {reason}")
        self.field = field
        self.offset = offset
        self.reason = reason


class _Padding:
    """Text with the padding removed, and the way back to offsets in the original text."""

    def __init__(self, text: str, null_text: str) -> None:
        pieces = text.split(null_text)
        self.clean = "".join(pieces)
        self._clean_starts: list[int] = []
        self._orig_starts: list[int] = []
        clean_at = orig_at = 0
        for piece in pieces:
            self._clean_starts.append(clean_at)
            self._orig_starts.append(orig_at)
            clean_at += len(piece)
            orig_at += len(piece) + len(null_text)

    def original_offset(self, clean_offset: int) -> int:
        i = bisect_right(self._clean_starts, clean_offset) - 1
        return self._orig_starts[i] + clean_offset - self._clean_starts[i]


def _preview(text: str, at: int, width: int) -> str:
    found = text[at: at + width]
    return repr(found) if found else "the end of the text"


def parse_sections(text: str, layout: SchemaLayout, *, null_text: str,
                   end_text: str | None = None) -> dict[str, object]:
    """Section-keyed values of an answer text; raises :class:`PlanParseError`.

    ``null_text`` is the null token's text (removed first); ``end_text``, if given, may follow
    the closing brace once.
    """
    if not null_text:
        raise ValueError("null_text must be the null token's (non-empty) text")
    if not isinstance(text, str):
        raise PlanParseError("answer", 0, f"expected text, got {type(text).__name__}")
    padding = _Padding(text, null_text)
    clean = padding.clean

    def fail(field: str, at: int, reason: str) -> PlanParseError:
        return PlanParseError(field, padding.original_offset(min(at, len(clean))), reason)

    values: list[object] = []
    pos = 0
    for (start, end), section in zip(layout.section_items, layout.sections, strict=True):
        for i in range(start, end):
            item = layout.template[i]
            if isinstance(item, Slot):
                stop = item.kind.scan(clean, pos)
                try:
                    values.append(item.kind.parse_value(clean[pos:stop]))
                except SlotValueError as exc:
                    raise fail(item.path, pos + exc.offset, exc.reason) from None
                pos = stop
                continue
            if not clean.startswith(item.text, pos):
                # Name the field this structure leads into, so "…,"pedestrian":"…" reads naturally.
                following = next((t.path for t in layout.template[i:end] if isinstance(t, Slot)), section.key)
                found = clean[pos: pos + len(item.text)]
                same = 0
                while same < len(found) and found[same] == item.text[same]:
                    same += 1
                raise fail(following, pos + same, f"expected {item.text!r}, found "
                                                  f"{_preview(clean, pos, len(item.text))}")
            pos += len(item.text)
    rest = clean[pos:]
    if rest and rest != end_text:
        raise fail("answer", pos, f"unexpected text after the answer: {_preview(clean, pos, 24)}")
    return layout.assemble(values)


def parse_plan(text: str, schema: PlanSchema[PlanT], *, null_text: str, end_text: str | None = None) -> PlanT:
    """The typed plan in ``text``; raises :class:`PlanParseError` (a ``ValueError``) if it is malformed."""
    return schema.plan_from_sections(parse_sections(text, schema.layout, null_text=null_text, end_text=end_text))


def try_parse_plan(text: str, schema: PlanSchema[PlanT], *, null_text: str,
                   end_text: str | None = None) -> PlanT | PlanParseError:
    """Like :func:`parse_plan`, but returns the error instead of raising (for long-running nodes)."""
    try:
        return parse_plan(text, schema, null_text=null_text, end_text=end_text)
    except PlanParseError as exc:
        return exc
