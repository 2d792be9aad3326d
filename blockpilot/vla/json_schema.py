"""Compile a subset of JSON Schema (draft 2020-12 keywords) into a scaffold layout.

A scaffold fixes the answer's whole structure before decoding, so only schemas whose every
instance has the same shape compile: objects with fixed keys, fixed-length arrays, and leaves
of bounded size. The supported subset:

============================================  ==============================================
keywords                                      compiles to
============================================  ==============================================
``type: object`` + ``properties``             :class:`Record` (keys in document order; every
(+ ``required``: all keys,                    key required; ``additionalProperties`` false or
``additionalProperties: false``)              absent — absent is read as closed)
``type: array`` + ``items`` +                 :class:`ArrayPart` of N copies of the item
``minItems == maxItems == N``
``type: array`` + ``prefixItems``             :class:`ArrayPart` of the listed parts (``items``
                                              false or absent; min/maxItems, if given, = N)
``enum`` of strings                           :class:`Categorical`
``type: boolean``                             :class:`JsonBoolean` (``true`` / ``false``)
``type: number`` + ``minimum``/``exclusive``  :class:`BoundedNumber`: fixed width, sign always,
``Minimum`` + ``maximum``/``exclusive``       ``multipleOf`` = 10^-k (k = 0..6) sets k fraction
``Maximum`` + ``multipleOf``                  digits (``integer``: 0, value an ``int``); the
                                              larger bound sets the integer digits (1..9)
``type: string`` + ``maxLength``              :class:`BoundedText`: ``maxLength`` tokens (or
(+ ``minLength``, ``x-max-tokens``)           ``x-max-tokens``), length checked on parse
``const`` (any JSON value)                    :class:`ConstPart`: frozen structure, no slot
``$ref`` (local ``#/...``), ``$defs``         the referenced schema (no recursion)
``title``, ``description``, ``$comment``,     ignored (annotations)
``examples``, ``default``, ``$schema``,
``$id``
============================================  ==============================================

Numbers are written fixed-width with a sign, ``+04.70``, which is not strict JSON (JSON has
no leading ``+`` or zeros); the scaffold's parser reads them, a JSON parser would not.
Everything else — optional or extra properties, unbounded arrays or numbers, ``oneOf`` /
``anyOf`` / ``allOf`` / ``not`` / ``if``, ``pattern``, ``format``, ``null``, type lists,
non-identifier keys, strings without a length bound — raises :class:`JsonSchemaError`
naming the JSON pointer of the offending schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .json_parts import ArrayPart, BoundedNumber, BoundedText, ConstPart, JsonBoolean
from .schema import Categorical, Part, Record, SchemaError, SchemaLayout, Section
from .slots import check_key

__all__ = ["JsonSchemaError", "JsonSchemaPlanSchema", "compile_schema", "load_json_schema"]

ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$defs", "definitions"})
MAX_TOKENS_KEY = "x-max-tokens"
_BY_TYPE = {
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "array": frozenset({"type", "items", "prefixItems", "minItems", "maxItems"}),
    "string": frozenset({"type", "maxLength", "minLength", MAX_TOKENS_KEY}),
    "number": frozenset({"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "boolean": frozenset({"type"}),
}
_BY_TYPE["integer"] = _BY_TYPE["number"]
_HINTS = {
    "oneOf": "alternatives have different shapes", "anyOf": "alternatives have different shapes",
    "allOf": "merge the schemas into one", "not": "negation", "if": "conditionals", "then": "conditionals",
    "else": "conditionals", "pattern": "a pattern does not fix the string's size",
    "patternProperties": "keys must be fixed", "format": "string formats are not checked",
    "uniqueItems": "item constraints", "contains": "item constraints", "dependentRequired": "optional keys",
    "dependentSchemas": "optional keys", "propertyNames": "keys must be fixed",
    "unevaluatedProperties": "keys must be fixed", "unevaluatedItems": "arrays have a fixed length",
    "$dynamicRef": "only local $ref is supported", "minProperties": "keys must be fixed",
    "maxProperties": "keys must be fixed",
}


class JsonSchemaError(SchemaError):
    """A JSON Schema document is outside the supported subset; ``pointer`` locates the schema."""

    def __init__(self, where: str, pointer: str, reason: str) -> None:
        super().__init__(f"{where}#{pointer}: {reason}")
        self.where = where
        self.pointer = pointer
        self.reason = reason


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


@dataclass(frozen=True)
class _Compiler:
    root: Mapping[str, Any]
    where: str

    def fail(self, pointer: str, reason: str) -> JsonSchemaError:
        return JsonSchemaError(self.where, pointer, reason)

    def resolve(self, ref: object, pointer: str) -> tuple[Any, str]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(pointer, f"only local references ('#/...') are supported, got {ref!r}")
        target = ref[1:]
        if target and not target.startswith("/"):
            raise self.fail(pointer, f"{ref!r} is not a JSON pointer reference ('#/$defs/name')")
        node: Any = self.root
        for token in (target.split("/")[1:] if target else []):
            key = _unescape(token)
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                raise self.fail(pointer, f"reference {ref!r} points at nothing")
        return node, target

    def part(self, node: Any, pointer: str, refs: tuple[str, ...] = ()) -> Part:
        if isinstance(node, bool):
            raise self.fail(pointer, f"the schema {str(node).lower()} admits any value (or none); "
                                     "the scaffold needs a fixed structure")
        if not isinstance(node, Mapping):
            raise self.fail(pointer, f"a schema must be an object, got {type(node).__name__}")
        if "$ref" in node:
            self.check_keys(node, pointer, frozenset({"$ref"}))
            target_node, target = self.resolve(node["$ref"], pointer + "/$ref")
            if target in refs:
                raise self.fail(pointer + "/$ref", f"recursive reference {node['$ref']!r}: a recursive schema has "
                                                   "no fixed size")
            return self.part(target_node, target, (*refs, target))
        if "const" in node:
            self.check_keys(node, pointer, frozenset({"const", "type"}))
            try:
                return ConstPart.of(node["const"])
            except ValueError as exc:
                raise self.fail(pointer + "/const", str(exc)) from None
        if "enum" in node:
            return self.enum(node, pointer)
        kind = node.get("type")
        if kind is None:
            self.check_keys(node, pointer, frozenset())
            raise self.fail(pointer, "a schema needs a 'type' (or 'enum', 'const', '$ref')")
        if not isinstance(kind, str) or kind not in _BY_TYPE:
            reason = ("a value that may be null has no fixed shape" if kind == "null" or
                      (isinstance(kind, list) and "null" in kind) else f"type must be one of {sorted(_BY_TYPE)}")
            raise self.fail(pointer + "/type", f"type {kind!r} is not supported: {reason}")
        self.check_keys(node, pointer, _BY_TYPE[kind])
        if kind == "object":
            return self.record(node, pointer, refs)
        if kind == "array":
            return self.array(node, pointer, refs)
        if kind == "string":
            return self.string(node, pointer)
        if kind == "boolean":
            return JsonBoolean()
        return self.number(node, pointer, integer=kind == "integer")

    def check_keys(self, node: Mapping[str, Any], pointer: str, allowed: frozenset[str]) -> None:
        for key in node:
            if key in allowed or key in ANNOTATIONS:
                continue
            hint = _HINTS.get(key, "outside the supported subset")
            raise self.fail(f"{pointer}/{_escape(str(key))}", f"keyword {key!r} is not supported ({hint})")

    def record(self, node: Mapping[str, Any], pointer: str, refs: tuple[str, ...]) -> Record:
        props = node.get("properties")
        if not isinstance(props, Mapping) or not props:
            raise self.fail(pointer + "/properties" if "properties" in node else pointer,
                            "an object needs a non-empty 'properties' object (its keys are fixed)")
        extra = node.get("additionalProperties", False)
        if extra is not False:
            raise self.fail(pointer + "/additionalProperties",
                            "additionalProperties must be false (or absent): the scaffold writes exactly the "
                            "listed keys")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(pointer + "/required", "required must be a list of property names")
        unknown = [r for r in required if r not in props]
        if unknown:
            raise self.fail(pointer + "/required", f"required names {unknown} are not in properties")
        fields: list[tuple[str, Part]] = []
        for key, sub in props.items():
            at = f"{pointer}/properties/{_escape(key)}"
            if key not in required:
                raise self.fail(at, f"property {key!r} is optional: every property must be listed in 'required' "
                                    "(the scaffold writes every key)")
            try:
                check_key(key, "property")
            except SchemaError as exc:
                raise self.fail(at, str(exc)) from None
            fields.append((key, self.part(sub, at, refs)))
        return Record(tuple(fields))

    def array(self, node: Mapping[str, Any], pointer: str, refs: tuple[str, ...]) -> ArrayPart:
        lo, hi = node.get("minItems"), node.get("maxItems")
        for key, value in (("minItems", lo), ("maxItems", hi)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise self.fail(f"{pointer}/{key}", f"{key} must be a positive integer, got {value!r}")
        if "prefixItems" in node:
            prefix = node["prefixItems"]
            if not isinstance(prefix, list) or not prefix:
                raise self.fail(pointer + "/prefixItems", "prefixItems must be a non-empty list of schemas")
            if node.get("items", False) is not False:
                raise self.fail(pointer + "/items", "with prefixItems, items must be false (or absent): the "
                                                    "array has exactly the listed items")
            for key, value in (("minItems", lo), ("maxItems", hi)):
                if value is not None and value != len(prefix):
                    raise self.fail(f"{pointer}/{key}", f"{key} {value} contradicts {len(prefix)} prefixItems")
            return ArrayPart(tuple(self.part(s, f"{pointer}/prefixItems/{i}", refs) for i, s in enumerate(prefix)))
        if "items" not in node:
            raise self.fail(pointer, "an array needs 'items' (one schema) or 'prefixItems'")
        if lo is None or hi is None or lo != hi:
            raise self.fail(pointer, f"an array needs minItems == maxItems (a fixed length), got {lo} and {hi}")
        item = self.part(node["items"], pointer + "/items", refs)
        return ArrayPart((item,) * lo)

    def string(self, node: Mapping[str, Any], pointer: str) -> BoundedText:
        values: dict[str, int | None] = {}
        for key in ("maxLength", "minLength", MAX_TOKENS_KEY):
            value = node.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0
                                      or (key != "minLength" and value < 1)):
                sign = "non-negative" if key == "minLength" else "positive"
                raise self.fail(f"{pointer}/{key}", f"{key} must be a {sign} integer, got {value!r}")
            values[key] = value
        max_length, tokens = values["maxLength"], values[MAX_TOKENS_KEY]
        budget = tokens if tokens is not None else max_length
        if budget is None:
            raise self.fail(pointer, f"a string needs maxLength (or {MAX_TOKENS_KEY}): the scaffold reserves a fixed "
                                     "number of tokens for it")
        try:
            return BoundedText(budget, min_length=values["minLength"] or 0, max_length=max_length)
        except SchemaError as exc:
            raise self.fail(pointer, str(exc)) from None

    def number(self, node: Mapping[str, Any], pointer: str, *, integer: bool) -> BoundedNumber:
        def bound(inclusive: str, exclusive: str) -> tuple[float, bool]:
            if inclusive in node and exclusive in node:
                raise self.fail(pointer, f"give {inclusive} or {exclusive}, not both")
            key = inclusive if inclusive in node else exclusive
            if key not in node:
                raise self.fail(pointer, f"a number needs {inclusive} (or {exclusive}): its bounds set its fixed width")
            value = node[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(f"{pointer}/{key}", f"{key} must be a finite number, got {value!r}")
            return float(value), key == exclusive

        lo, lo_ex = bound("minimum", "exclusiveMinimum")
        hi, hi_ex = bound("maximum", "exclusiveMaximum")
        if lo > hi:
            raise self.fail(pointer, f"minimum {lo:g} exceeds maximum {hi:g}")
        step = node.get("multipleOf", 1 if integer else None)
        if step is None:
            raise self.fail(pointer, "a number needs multipleOf, a power of ten such as 0.01, to fix its decimals "
                                     "(or use type integer)")
        frac = next((k for k in range(7) if not isinstance(step, bool) and isinstance(step, (int, float))
                     and math.isclose(step, 10.0 ** -k, rel_tol=1e-9)), None)
        if frac is None or (integer and frac):
            allowed = "1" if integer else "a power of ten from 1 down to 0.000001"
            raise self.fail(pointer + "/multipleOf", f"multipleOf must be {allowed}, got {step!r}")
        magnitude = max(abs(lo), abs(hi))
        int_digits = max(1, len(f"{magnitude:.{frac}f}".split(".")[0]))
        if int_digits > 9:
            raise self.fail(pointer, f"bounds [{lo:g}, {hi:g}] need {int_digits} integer digits; at most 9")
        return BoundedNumber(int_digits, frac, minimum=lo, maximum=hi, exclusive_minimum=lo_ex,
                             exclusive_maximum=hi_ex, integer=integer)

    def enum(self, node: Mapping[str, Any], pointer: str) -> Part:
        self.check_keys(node, pointer, frozenset({"enum", "type"}))
        options = node["enum"]
        if not isinstance(options, list) or not options:
            raise self.fail(pointer + "/enum", "enum must be a non-empty list")
        kind = node.get("type")
        if all(isinstance(o, bool) for o in options) and kind in (None, "boolean"):
            if sorted(options) == [False, True] and len(options) == 2:
                return JsonBoolean()
            if len(options) == 1:
                return ConstPart.of(options[0])
        if not all(isinstance(o, str) for o in options) or kind not in (None, "string"):
            raise self.fail(pointer + "/enum", "enum values must all be strings (or true and false)")
        try:
            return Categorical(tuple(options))
        except SchemaError as exc:
            raise self.fail(pointer + "/enum", str(exc)) from None


@dataclass(frozen=True, eq=False)
class JsonSchemaPlanSchema:
    """A compiled JSON Schema: a :class:`PlanSchema` whose plans are plain JSON values (dicts).

    ``document`` is the source schema; values parse to ``dict`` / ``list`` / ``str`` / ``bool`` /
    ``float`` (``int`` for ``integer``), so ``parse(render(value)) == value`` for a value that
    fits (numbers at their decimals).
    """

    document: Mapping[str, Any]
    layout: SchemaLayout
    where: str = "<schema>"

    def sections_from_plan(self, plan: Mapping[str, object]) -> dict[str, object]:
        if not isinstance(plan, Mapping):
            raise SchemaError(f"answer: expected an object, got {type(plan).__name__}")
        return dict(plan)

    def plan_from_sections(self, sections: Mapping[str, object]) -> dict[str, object]:
        return dict(sections)

    def render(self, plan: Mapping[str, object]) -> str:
        """The canonical answer text of ``plan``; raises :class:`SchemaError` if it does not fit."""
        return self.layout.render(self.sections_from_plan(plan))

    def parse(self, text: str, *, null_text: str, end_text: str | None = None) -> dict[str, object]:
        """The value in an answer text; raises :class:`~.answer_parser.PlanParseError`."""
        from .answer_parser import parse_sections

        return self.plan_from_sections(parse_sections(text, self.layout, null_text=null_text, end_text=end_text))


def compile_schema(document: Mapping[str, Any], where: str = "<schema>") -> JsonSchemaPlanSchema:
    """Compile a JSON Schema document (top level an object) into a scaffold layout.

    Raises :class:`JsonSchemaError` naming ``where`` and the JSON pointer of the first schema
    outside the supported subset (see the module docstring).
    """
    compiler = _Compiler(document, where)
    part = compiler.part(document, "")
    if not isinstance(part, Record):
        raise compiler.fail("", "the top level must be an object schema (type object with properties)")
    if part.slot_count == 0:
        raise compiler.fail("", "the schema has no value slots (every value is a const): nothing to decode")
    layout = SchemaLayout(tuple(Section(key, sub) for key, sub in part.fields))
    return JsonSchemaPlanSchema(document, layout, where)


def load_json_schema(path: str | Path) -> JsonSchemaPlanSchema:
    """Read and compile a JSON Schema file; raises :class:`JsonSchemaError` (also for unreadable JSON)."""
    file = Path(path)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonSchemaError(str(file), "", f"not readable JSON ({exc})") from None
    if not isinstance(document, dict):
        raise JsonSchemaError(str(file), "", f"a schema document must be a JSON object, got {type(document).__name__}")
    return compile_schema(document, str(file))
