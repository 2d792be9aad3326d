"""Slot kinds of an answer layout and the building blocks every part shares.

A slot holds one value: a category from a fixed vocabulary, free text, or a fixed-width signed
number. Each kind formats a value to text, finds where its raw text ends in an answer, and
parses that raw text back, reporting the offending character on failure.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import BlockpilotError

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class SchemaError(BlockpilotError, ValueError):
    """A schema is malformed, or a value does not fit its slot; the message names the field."""


class SlotValueError(BlockpilotError, ValueError):
    """A slot's raw text is not a valid value; ``offset`` counts characters into that raw text."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


def check_key(key: str, where: str) -> None:
    # Keys double as path components ("trajectory.3.1"), so they stay identifiers.
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise SchemaError(f"{where}: key {key!r} must be an identifier ([A-Za-z][A-Za-z0-9_]*)")


def check_unique(names: Sequence[str], where: str) -> None:
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SchemaError(f"{where}: duplicate names {dups}")


def _short(text: str, limit: int = 24) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


@dataclass(frozen=True, slots=True)
class Structure:
    """Template text that never changes (frozen in the scaffold)."""

    text: str


@dataclass(frozen=True, slots=True)
class Slot:
    """One value position; ``path`` names it, e.g. ``critical_objects.pedestrian`` or ``trajectory.3.1``."""

    path: str
    kind: SlotKind


Item = Structure | Slot


class Part(ABC):
    """A piece of the answer: flattens to template items, formats a value to slot texts, rebuilds it."""

    @property
    @abstractmethod
    def slot_count(self) -> int: ...

    @abstractmethod
    def items(self, path: str) -> list[Item]: ...

    @abstractmethod
    def format_slots(self, value: object, path: str) -> list[str]:
        """Slot texts of ``value`` in template order; raises :class:`SchemaError` if it does not fit."""

    @abstractmethod
    def assemble(self, values: Sequence[object]) -> object:
        """Rebuild the part's value from its parsed slot values (in template order)."""


class SlotKind(Part):
    """A leaf part: exactly one slot, with its own text format."""

    quoted = False  # string-valued slots sit between quotes that belong to the structure

    @property
    def slot_count(self) -> int:
        return 1

    def items(self, path: str) -> list[Item]:
        if self.quoted:
            return [Structure('"'), Slot(path, self), Structure('"')]
        return [Slot(path, self)]

    def format_slots(self, value: object, path: str) -> list[str]:
        return [self.format_value(value, path)]

    def assemble(self, values: Sequence[object]) -> object:
        return values[0]

    @abstractmethod
    def format_value(self, value: object, path: str) -> str: ...

    @abstractmethod
    def scan(self, text: str, start: int) -> int:
        """End (exclusive) of this slot's raw text when it starts at ``start``; at most ``len(text)``."""

    @abstractmethod
    def parse_value(self, raw: str) -> object:
        """Value of the raw slot text; raises :class:`SlotValueError`."""


@dataclass(frozen=True, slots=True)
class Categorical(SlotKind):
    """One of a fixed vocabulary of strings (in the scaffold: padded to the longest option)."""

    options: tuple[str, ...]
    quoted = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if not self.options:
            raise SchemaError("Categorical needs at least one option")
        for opt in self.options:
            # Options appear verbatim between quotes, so they must need no JSON escaping.
            if (not isinstance(opt, str) or not opt or not opt.isprintable() or '"' in opt
                    or "\\" in opt or opt != opt.strip()):
                raise SchemaError(f"Categorical option {opt!r} must be non-empty printable text without "
                                  "quotes, backslashes or outer spaces")
        check_unique(self.options, "Categorical options")

    def format_value(self, value: object, path: str) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise SchemaError(f"{path}: {value!r} is not one of {list(self.options)}")
        return value

    def scan(self, text: str, start: int) -> int:
        end = text.find('"', start)
        return len(text) if end < 0 else end

    def parse_value(self, raw: str) -> object:
        if raw not in self.options:
            raise SlotValueError(f"{_short(raw)} is not one of {list(self.options)}", 0)
        return raw


@dataclass(frozen=True, slots=True)
class FreeText(SlotKind):
    """A JSON string of at most ``max_tokens`` tokens (the scaffold pads it with the null token)."""

    max_tokens: int
    quoted = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SchemaError(f"FreeText.max_tokens must be a positive int, got {self.max_tokens!r}")

    def format_value(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected text, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SchemaError(f"{path}: text is not valid Unicode at character {exc.start}") from exc
        return json.dumps(value, ensure_ascii=False)[1:-1]

    def scan(self, text: str, start: int) -> int:
        i = start
        while i < len(text):
            if text[i] == "\\":
                i += 2
            elif text[i] == '"':
                return i
            else:
                i += 1
        return len(text)

    def parse_value(self, raw: str) -> object:
        try:
            value = json.loads('"' + raw + '"')
        except json.JSONDecodeError as exc:
            at = min(max(exc.pos - 1, 0), len(raw))  # exc.pos counts the opening quote added above
            raise SlotValueError(f"invalid JSON string content ({exc.msg})", at) from exc
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SlotValueError("text holds an unpaired surrogate", 0) from exc
        return value


@dataclass(frozen=True, slots=True)
class FixedNumber(SlotKind):
    """A signed fixed-width decimal such as ``+14.70`` or ``-00.04``: sign always, zero-padded."""

    int_digits: int = 2
    frac_digits: int = 2

    def __post_init__(self) -> None:
        if (not isinstance(self.int_digits, int) or not isinstance(self.frac_digits, int)
                or not 1 <= self.int_digits <= 9 or not 0 <= self.frac_digits <= 6):
            raise SchemaError(f"FixedNumber needs 1..9 integer and 0..6 fraction digits, got "
                              f"{self.int_digits} and {self.frac_digits}")

    @property
    def width(self) -> int:
        return 1 + self.int_digits + (1 + self.frac_digits if self.frac_digits else 0)

    @property
    def max_abs(self) -> float:
        return 10.0 ** self.int_digits - 10.0 ** -self.frac_digits

    def format_value(self, value: object, path: str) -> str:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{path}: expected a number, got {value!r}") from exc
        if not math.isfinite(number):
            raise SchemaError(f"{path}: {number} is not finite")
        body = f"{abs(number):0{self.width - 1}.{self.frac_digits}f}"
        if len(body) != self.width - 1:
            raise SchemaError(f"{path}: {number} is outside ±{self.max_abs:.{self.frac_digits}f} "
                              f"({self.int_digits} integer, {self.frac_digits} fraction digits)")
        # A value that rounds to zero is written "+", so every number has one spelling.
        sign = "-" if number < 0 and body.strip("0.") else "+"
        return sign + body

    def scan(self, text: str, start: int) -> int:
        return min(start + self.width, len(text))

    def parse_value(self, raw: str) -> object:
        point = 1 + self.int_digits
        for i, ch in enumerate(raw[: self.width]):
            if i == 0:
                ok = ch in "+-"
            elif i == point and self.frac_digits:
                ok = ch == "."
            else:
                ok = "0" <= ch <= "9"  # str.isdigit would accept non-ASCII digits
            if not ok:
                raise SlotValueError(f"{_short(raw)} does not match the format {self._pattern()}", i)
        if len(raw) != self.width:
            raise SlotValueError(f"number is cut short: {_short(raw)} for format {self._pattern()}", len(raw))
        return float(raw)

    def _pattern(self) -> str:
        return "±" + "d" * self.int_digits + ("." + "d" * self.frac_digits if self.frac_digits else "")
