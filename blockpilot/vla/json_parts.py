"""Slot kinds and parts that JSON Schema documents compile into (see :mod:`.json_schema`).

Each slot kind subclasses one of the three base kinds of :mod:`.slots` — :class:`Categorical`,
:class:`FixedNumber`, :class:`FreeText` — so code that dispatches on those (scaffold slot
lengths, per-position allowed-token masks) covers them unchanged; the subclasses add only the
JSON-level checks (range, integer, text length) and the JSON value type (``bool``, ``int``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .slots import Categorical, FixedNumber, FreeText, Item, Part, SchemaError, SlotValueError, Structure


@dataclass(frozen=True, slots=True)
class JsonBoolean(Categorical):
    """A JSON ``true`` / ``false``, written unquoted; its value is a ``bool``.

    A :class:`Categorical` whose options are the two spellings, so constraint code reading
    ``.options`` allows exactly the tokens of ``true`` and ``false``.
    """

    options: tuple[str, ...] = ("true", "false")
    quoted = False

    def __post_init__(self) -> None:
        Categorical.__post_init__(self)
        if self.options != ("true", "false"):
            raise SchemaError(f"JsonBoolean options are ('true', 'false'), got {self.options!r}")

    def format_value(self, value: object, path: str) -> str:
        if not isinstance(value, (bool, np.bool_)):
            raise SchemaError(f"{path}: expected a bool, got {value!r}")
        return "true" if value else "false"

    def scan(self, text: str, start: int) -> int:
        # Unquoted: the raw text runs to the structure that follows (",", "]" or "}").
        ends = [i for i in (text.find(c, start) for c in ",]}") if i >= 0]
        return min(ends) if ends else len(text)

    def parse_value(self, raw: str) -> object:
        if raw == "true":
            return True
        if raw == "false":
            return False
        same = max(len(_common_prefix(option, raw)) for option in self.options)
        raise SlotValueError(f"{raw[:24]!r} is not true or false", same)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@dataclass(frozen=True, slots=True)
class BoundedNumber(FixedNumber):
    """A :class:`FixedNumber` with a JSON Schema range; ``integer`` numbers parse to ``int``.

    The range applies to the value as written (rounded to ``frac_digits``): formatting a value
    that rounds outside it raises :class:`SchemaError`, parsing one raises :class:`SlotValueError`.
    """

    minimum: float = -math.inf
    maximum: float = math.inf
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        FixedNumber.__post_init__(self)
        if not self.minimum <= self.maximum:
            raise SchemaError(f"BoundedNumber: minimum {self.minimum} exceeds maximum {self.maximum}")
        if self.integer and self.frac_digits:
            raise SchemaError("BoundedNumber: an integer has no fraction digits")

    def range_text(self) -> str:
        lo = "(" if self.exclusive_minimum else "["
        hi = ")" if self.exclusive_maximum else "]"
        return f"{lo}{self.minimum:g}, {self.maximum:g}{hi}"

    def out_of_range(self, number: float) -> bool:
        low = number <= self.minimum if self.exclusive_minimum else number < self.minimum
        high = number >= self.maximum if self.exclusive_maximum else number > self.maximum
        return low or high

    def format_value(self, value: object, path: str) -> str:
        if isinstance(value, (bool, np.bool_)):
            raise SchemaError(f"{path}: expected a number, got {value!r}")
        text = FixedNumber.format_value(self, value, path)
        if self.integer and not float(value).is_integer():  # type: ignore[arg-type]
            raise SchemaError(f"{path}: expected an integer, got {value!r}")
        if self.out_of_range(float(text)):
            raise SchemaError(f"{path}: {value!r} (written {text}) is outside {self.range_text()}")
        return text

    def parse_value(self, raw: str) -> object:
        number = FixedNumber.parse_value(self, raw)
        assert isinstance(number, float)
        if self.out_of_range(number):
            raise SlotValueError(f"{raw!r} is outside {self.range_text()}", 0)
        return int(number) if self.integer else number


@dataclass(frozen=True, slots=True)
class BoundedText(FreeText):
    """A :class:`FreeText` with JSON Schema ``minLength`` / ``maxLength`` (characters, checked both ways)."""

    min_length: int = 0
    max_length: int | None = None

    def __post_init__(self) -> None:
        FreeText.__post_init__(self)
        if self.max_length is not None and not 0 <= self.min_length <= self.max_length:
            raise SchemaError(f"BoundedText: need 0 <= minLength <= maxLength, got {self.min_length}, "
                              f"{self.max_length}")

    def _length_problem(self, text: str) -> str | None:
        if len(text) < self.min_length:
            return f"text of {len(text)} characters is shorter than minLength {self.min_length}"
        if self.max_length is not None and len(text) > self.max_length:
            return f"text of {len(text)} characters is longer than maxLength {self.max_length}"
        return None

    def format_value(self, value: object, path: str) -> str:
        raw = FreeText.format_value(self, value, path)
        assert isinstance(value, str)
        problem = self._length_problem(value)
        if problem:
            raise SchemaError(f"{path}: {problem}")
        return raw

    def parse_value(self, raw: str) -> object:
        value = FreeText.parse_value(self, raw)
        assert isinstance(value, str)
        problem = self._length_problem(value)
        if problem:
            # Point at the first character past the limit (in canonical escaping), or the end.
            at = len(json.dumps(value[: self.max_length or 0], ensure_ascii=False)) - 2 \
                if self.max_length is not None and len(value) > self.max_length else len(raw)
            raise SlotValueError(problem, min(at, len(raw)))
        return value


@dataclass(frozen=True, slots=True)
class ArrayPart(Part):
    """A JSON array of a fixed number of elements, each its own part; its value is a ``list``."""

    elements: tuple[Part, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "elements", tuple(self.elements))
        if not self.elements:
            raise SchemaError("ArrayPart needs at least one element")

    @property
    def slot_count(self) -> int:
        return sum(part.slot_count for part in self.elements)

    def items(self, path: str) -> list[Item]:
        out: list[Item] = [Structure("[")]
        for i, part in enumerate(self.elements):
            out.append(Structure("," if i else ""))
            out += part.items(f"{path}.{i}")
        out.append(Structure("]"))
        return out

    def format_slots(self, value: object, path: str) -> list[str]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
            raise SchemaError(f"{path}: expected an array of {len(self.elements)} items, got "
                              f"{type(value).__name__}")
        if len(value) != len(self.elements):
            raise SchemaError(f"{path}: expected {len(self.elements)} items, got {len(value)}")
        return [text for i, (part, item) in enumerate(zip(self.elements, value, strict=True))
                for text in part.format_slots(item, f"{path}.{i}")]

    def assemble(self, values: Sequence[object]) -> object:
        out: list[object] = []
        at = 0
        for part in self.elements:
            out.append(part.assemble(values[at: at + part.slot_count]))
            at += part.slot_count
        return out


@dataclass(frozen=True, slots=True)
class ConstPart(Part):
    """A JSON ``const``: written whole into the structure (frozen), no slot; ``text`` is its compact JSON."""

    text: str

    @classmethod
    def of(cls, value: object) -> ConstPart:
        return cls(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))

    @property
    def slot_count(self) -> int:
        return 0

    def items(self, path: str) -> list[Item]:
        return [Structure(self.text)]

    def format_slots(self, value: object, path: str) -> list[str]:
        try:
            same = ConstPart.of(value).text == self.text
        except (TypeError, ValueError):
            same = False
        if not same:
            raise SchemaError(f"{path}: expected the constant {self.text}, got {value!r}")
        return []

    def assemble(self, values: Sequence[object]) -> object:
        return json.loads(self.text)
