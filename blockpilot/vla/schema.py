"""Answer layouts built from parts: a JSON-shaped template of fixed structure and value slots.

A layout is a sequence of sections in causal (decoding) order; each section is a key and a part.
Parts flatten to *structure* text (braces, keys, quotes, commas) and *slots* (one value each,
see :mod:`.slots`). Every slot has a fixed width — a fixed character count for numbers, a fixed
token count for text and categories once a tokenizer is chosen — so a block-diffusion decoder
can fill a scaffold whose structure is known before any token is generated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .slots import (
    Categorical,
    FixedNumber,
    FreeText,
    Item,
    Part,
    SchemaError,
    Slot,
    SlotKind,
    SlotValueError,
    Structure,
    check_key,
    check_unique,
)

__all__ = [
    "Categorical", "FixedNumber", "FlagGroup", "FreeText", "Item", "Part", "Record", "SchemaError", "SchemaLayout",
    "Section", "Slot", "SlotKind", "SlotValueError", "Structure", "WaypointList", "exact_mapping",
]


@dataclass(frozen=True, slots=True)
class FlagGroup(Part):
    """An object of fixed keys, each ``"yes"`` or ``"no"``; its value is a ``dict[str, bool]``."""

    keys: tuple[str, ...]
    yes: str = "yes"
    no: str = "no"
    flag: Categorical = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        if not self.keys:
            raise SchemaError("FlagGroup needs at least one key")
        for k in self.keys:
            check_key(k, "FlagGroup")
        check_unique(self.keys, "FlagGroup keys")
        object.__setattr__(self, "flag", Categorical((self.yes, self.no)))

    @property
    def slot_count(self) -> int:
        return len(self.keys)

    def items(self, path: str) -> list[Item]:
        out: list[Item] = [Structure("{")]
        for i, k in enumerate(self.keys):
            out.append(Structure(("," if i else "") + f'"{k}":'))
            out += self.flag.items(f"{path}.{k}")
        out.append(Structure("}"))
        return out

    def format_slots(self, value: object, path: str) -> list[str]:
        flags = exact_mapping(value, self.keys, path)
        out = []
        for k in self.keys:
            v = flags[k]
            if not isinstance(v, (bool, np.bool_)):
                raise SchemaError(f"{path}.{k}: expected a bool, got {v!r}")
            out.append(self.yes if v else self.no)
        return out

    def assemble(self, values: Sequence[object]) -> object:
        return {k: v == self.yes for k, v in zip(self.keys, values, strict=True)}


@dataclass(frozen=True, slots=True)
class Record(Part):
    """An object of named parts in fixed order; its value is a ``dict`` of the parts' values."""

    fields: tuple[tuple[str, Part], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(tuple(f) for f in self.fields))
        if not self.fields:
            raise SchemaError("Record needs at least one field")
        for key, part in self.fields:
            check_key(key, "Record")
            if not isinstance(part, Part):
                raise SchemaError(f"Record field {key!r}: {part!r} is not a Part")
        check_unique([k for k, _ in self.fields], "Record keys")

    @property
    def slot_count(self) -> int:
        return sum(part.slot_count for _, part in self.fields)

    def items(self, path: str) -> list[Item]:
        out: list[Item] = [Structure("{")]
        for i, (key, part) in enumerate(self.fields):
            out.append(Structure(("," if i else "") + f'"{key}":'))
            out += part.items(f"{path}.{key}")
        out.append(Structure("}"))
        return out

    def format_slots(self, value: object, path: str) -> list[str]:
        record = exact_mapping(value, [k for k, _ in self.fields], path)
        return [text for key, part in self.fields for text in part.format_slots(record[key], f"{path}.{key}")]

    def assemble(self, values: Sequence[object]) -> object:
        out: dict[str, object] = {}
        at = 0
        for key, part in self.fields:
            out[key] = part.assemble(values[at: at + part.slot_count])
            at += part.slot_count
        return out


@dataclass(frozen=True, slots=True)
class WaypointList(Part):
    """``num_points`` points of ``dims`` fixed-width numbers: ``[[+14.70,-00.04],...]``."""

    num_points: int
    dims: int
    number: FixedNumber = field(default_factory=FixedNumber)

    def __post_init__(self) -> None:
        if not isinstance(self.num_points, int) or self.num_points < 1:
            raise SchemaError(f"WaypointList.num_points must be a positive int, got {self.num_points!r}")
        if not isinstance(self.dims, int) or self.dims < 1:
            raise SchemaError(f"WaypointList.dims must be a positive int, got {self.dims!r}")

    @property
    def slot_count(self) -> int:
        return self.num_points * self.dims

    def items(self, path: str) -> list[Item]:
        out: list[Item] = [Structure("[")]
        for i in range(self.num_points):
            out.append(Structure("," if i else ""))
            for d in range(self.dims):
                out.append(Structure("," if d else "["))
                out += self.number.items(f"{path}.{i}.{d}")
            out.append(Structure("]"))
        out.append(Structure("]"))
        return out

    def format_slots(self, value: object, path: str) -> list[str]:
        try:
            points = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{path}: expected a ({self.num_points}, {self.dims}) array of numbers") from exc
        if points.shape != (self.num_points, self.dims):
            raise SchemaError(f"{path}: expected shape ({self.num_points}, {self.dims}), got {points.shape}")
        return [self.number.format_value(points[i, d], f"{path}.{i}.{d}")
                for i in range(self.num_points) for d in range(self.dims)]

    def assemble(self, values: Sequence[object]) -> npt.NDArray[np.float64]:
        return np.array(values, dtype=np.float64).reshape(self.num_points, self.dims)


def exact_mapping(value: object, keys: Sequence[str], path: str) -> Mapping[str, object]:
    """``value`` as a mapping with exactly ``keys``; a :class:`SchemaError` naming ``path`` otherwise."""
    if not isinstance(value, Mapping):
        raise SchemaError(f"{path}: expected a mapping with keys {list(keys)}, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    extra = sorted(str(k) for k in value if k not in keys)
    if missing or extra:
        raise SchemaError(f"{path}: missing keys {missing}, unexpected keys {extra}")
    return value


def _merge(items: list[Item]) -> list[Item]:
    """Join neighbouring structure texts so that each frozen run is one segment."""
    out: list[Item] = []
    for item in items:
        if isinstance(item, Structure):
            if not item.text:
                continue
            if out and isinstance(out[-1], Structure):
                out[-1] = Structure(out[-1].text + item.text)
                continue
        out.append(item)
    return out


@dataclass(frozen=True, slots=True)
class Section:
    key: str
    part: Part


@dataclass(frozen=True, slots=True)
class SchemaLayout:
    """A JSON object of sections in causal order, flattened once into a template of items.

    ``section_items[i]`` is the ``[start, end)`` range of section ``i`` in ``template``; each
    section's items begin with its separator and key, the last also holds the closing brace.
    """

    sections: tuple[Section, ...]
    template: tuple[Item, ...] = field(init=False, repr=False, compare=False)
    section_items: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections", tuple(self.sections))
        if not self.sections:
            raise SchemaError("SchemaLayout needs at least one section")
        for s in self.sections:
            check_key(s.key, "SchemaLayout")
        check_unique([s.key for s in self.sections], "SchemaLayout section keys")
        template: list[Item] = []
        ranges = []
        last = len(self.sections) - 1
        for i, s in enumerate(self.sections):
            items = [Structure(("," if i else "{") + f'"{s.key}":'), *s.part.items(s.key)]
            if i == last:
                items.append(Structure("}"))
            merged = _merge(items)
            ranges.append((len(template), len(template) + len(merged)))
            template += merged
        object.__setattr__(self, "template", tuple(template))
        object.__setattr__(self, "section_items", tuple(ranges))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.sections)

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(item for item in self.template if isinstance(item, Slot))

    def format_slots(self, values: Mapping[str, object]) -> list[str]:
        """Slot texts of a section-keyed value dict, in template order."""
        checked = exact_mapping(values, self.keys, "answer")
        return [text for s in self.sections for text in s.part.format_slots(checked[s.key], s.key)]

    def render(self, values: Mapping[str, object]) -> str:
        """The canonical answer text (no padding tokens)."""
        texts = iter(self.format_slots(values))
        return "".join(item.text if isinstance(item, Structure) else next(texts) for item in self.template)

    def assemble(self, slot_values: Sequence[object]) -> dict[str, object]:
        """Section-keyed values from parsed slot values in template order."""
        out: dict[str, object] = {}
        at = 0
        for s in self.sections:
            out[s.key] = s.part.assemble(slot_values[at: at + s.part.slot_count])
            at += s.part.slot_count
        return out
