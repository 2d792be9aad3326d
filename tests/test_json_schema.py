"""JSON Schema subset -> scaffold: round trips, generated schemas, refusals, presets as compiled documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockpilot.cli import main
from blockpilot.vla.answer_parser import PlanParseError
from blockpilot.vla.hf_config import load_config
from blockpilot.vla.json_parts import ArrayPart, BoundedNumber, BoundedText, ConstPart, JsonBoolean
from blockpilot.vla.json_schema import JsonSchemaError, compile_schema, load_json_schema
from blockpilot.vla.plans import DRIVING_PRESETS, DrivingSchema, RobotActionSchema
from blockpilot.vla.reference_tokenizer import NULL_TEXT
from blockpilot.vla.scaffold import build_scaffold
from blockpilot.vla.schema import (
    Categorical,
    FixedNumber,
    FlagGroup,
    FreeText,
    Record,
    SchemaError,
    SchemaLayout,
    Section,
    Slot,
    SlotValueError,
    Structure,
    WaypointList,
)
from blockpilot.vla.tokenizer import Tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "reference"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(SHIPPED, load_config(SHIPPED).tokens)


def obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def num(lo: float, hi: float, step: float = 0.01) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi, "multipleOf": step}


def arr(n: int, items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "minItems": n, "maxItems": n, "items": items}


PICK_PLACE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pick-and-place action chunk",
    **obj(action={"const": "pick_place"}, object={"enum": ["cube", "cup", "bottle"]}, grasp={"type": "boolean"},
          chunk=arr(3, {"$ref": "#/$defs/pose"}), note={"type": "string", "maxLength": 24}),
    "$defs": {"pose": {"type": "array", "prefixItems": [num(-1, 1), num(-1, 1), num(0, 1.5),
                                                        {"type": "integer", "minimum": 0, "maximum": 359}]}},
}
DETECTIONS = obj(
    count={"type": "integer", "minimum": 0, "maximum": 3},
    boxes=arr(3, obj(label={"enum": ["car", "pedestrian", "cyclist", "none"]}, occluded={"type": "boolean"},
                     box=arr(4, num(0, 1, 0.001)), score=num(0, 1))),
)
NESTED = obj(meta=obj(version={"const": 2}, mode={"enum": ["a", "b"]}),
             grid=arr(2, arr(2, {"type": "integer", "minimum": -50, "maximum": 50})),
             flags={"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": [True, False]}]},
             text={"type": "string", "minLength": 1, "maxLength": 40})

VALUES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (PICK_PLACE, {"action": "pick_place", "object": "cup", "grasp": True,
                  "chunk": [[0.1, -0.25, 1.5, 90], [-1.0, 1.0, 0.0, 0], [0.0, 0.0, 0.33, 359]],
                  "note": 'lift "slowly" \\ now'}),
    (DETECTIONS, {"count": 2, "boxes": [
        {"label": "car", "occluded": False, "box": [0.1, 0.2, 0.5, 0.75], "score": 0.98},
        {"label": "pedestrian", "occluded": True, "box": [0.0, 0.0, 1.0, 1.0], "score": 0.5},
        {"label": "none", "occluded": False, "box": [0.0, 0.0, 0.0, 0.0], "score": 0.0}]}),
    (NESTED, {"meta": {"version": 2, "mode": "b"}, "grid": [[-50, 0], [7, 50]], "flags": [False, True],
              "text": "ünïcödé, {braces} and \"quotes\""}),
]


@pytest.mark.parametrize(("document", "value"), VALUES)
def test_hand_written_schemas_round_trip(tok: Tokenizer, document: dict[str, Any], value: dict[str, Any]) -> None:
    schema = compile_schema(document)
    text = schema.render(value)
    assert schema.parse(text, null_text=NULL_TEXT) == value
    scaffold = build_scaffold(schema, tok)
    ids = scaffold.encode_plan(value)
    assert scaffold.decode_plan(ids) == value
    assert np.array_equal(ids[scaffold.frozen], scaffold.token_ids[scaffold.frozen])
    # With the signs and leading zeros of the fixed-width numbers dropped, the text is the value as JSON.
    assert json.loads(_strict_json(schema.layout, value)) == value


def _strict_json(layout: SchemaLayout, value: dict[str, Any]) -> str:
    texts = iter(layout.format_slots(value))
    out = []
    for item in layout.template:
        if isinstance(item, Structure):
            out.append(item.text)
        else:
            raw = next(texts)
            out.append(json.dumps(float(raw)) if isinstance(item.kind, FixedNumber) else raw)
    return "".join(out)


def test_compiled_kinds_and_template() -> None:
    layout = compile_schema(PICK_PLACE).layout
    assert layout.keys == ("action", "object", "grasp", "chunk", "note")
    kinds = {s.path: s.kind for s in layout.slots}
    assert "action" not in kinds  # a const is frozen structure
    assert kinds["object"] == Categorical(("cube", "cup", "bottle"))
    assert isinstance(kinds["grasp"], JsonBoolean) and isinstance(kinds["grasp"], Categorical)
    x, z, angle = kinds["chunk.0.0"], kinds["chunk.0.2"], kinds["chunk.2.3"]
    assert isinstance(x, BoundedNumber) and (x.int_digits, x.frac_digits, x.minimum, x.maximum) == (1, 2, -1, 1)
    assert isinstance(z, BoundedNumber) and (z.int_digits, z.frac_digits) == (1, 2)
    assert isinstance(angle, BoundedNumber) and (angle.int_digits, angle.frac_digits, angle.integer) == (3, 0, True)
    note = kinds["note"]
    assert isinstance(note, BoundedText) and isinstance(note, FreeText)
    assert (note.max_tokens, note.max_length) == (24, 24)
    structure = [item.text for item in layout.template if isinstance(item, Structure)]
    # Structure merges within a section; the const section is structure only.
    assert structure[:5] == ['{"action":"pick_place"', ',"object":"', '"', ',"grasp":', ',"chunk":[[']
    assert structure[-1] == '"}'


def test_presets_compile_to_the_hand_built_layouts(tok: Tokenizer) -> None:
    """The presets' templates and scaffold tokens are what the hand-built parts gave before."""

    class Legacy:
        def __init__(self, layout: SchemaLayout) -> None:
            self.layout = layout

    def driving(s: DrivingSchema) -> SchemaLayout:
        return SchemaLayout((
            Section("critical_objects", FlagGroup(s.critical_object_keys)),
            Section("explanation", FreeText(s.explanation_tokens)),
            Section("future_meta_behavior", Record((("longitudinal", Categorical(s.longitudinal_options)),
                                                    ("lateral", Categorical(s.lateral_options))))),
            Section("trajectory", WaypointList(s.num_waypoints, 2, FixedNumber(s.int_digits, s.frac_digits))),
        ))

    robot = RobotActionSchema()
    cases = [(DRIVING_PRESETS["nuscenes"], driving(DRIVING_PRESETS["nuscenes"])),
             (DRIVING_PRESETS["wod_e2e"], driving(DRIVING_PRESETS["wod_e2e"])),
             (robot, SchemaLayout((
                 Section("subtask", FreeText(robot.subtask_tokens)),
                 Section("gripper", Categorical(robot.gripper_options)),
                 Section("waypoints", WaypointList(robot.num_waypoints, 3, FixedNumber(robot.int_digits,
                                                                                        robot.frac_digits))))))]
    for schema, legacy in cases:
        assert compile_schema(schema.json_schema()).layout.template == schema.layout.template
        assert _shape(schema.layout) == _shape(legacy)
        assert schema.layout.section_items == legacy.section_items
        new, old = build_scaffold(schema, tok), build_scaffold(Legacy(legacy), tok)
        assert new.token_ids.tolist() == old.token_ids.tolist()
        assert new.frozen.tolist() == old.frozen.tolist()
        assert [(s.path, s.start, s.length) for s in new.slots] == [(s.path, s.start, s.length) for s in old.slots]


def _shape(layout: SchemaLayout) -> list[object]:
    """Template as text and slot formats, whatever subclass carries a format."""
    out: list[object] = []
    for item in layout.template:
        if isinstance(item, Structure):
            out.append(item.text)
        else:
            assert isinstance(item, Slot)
            k = item.kind
            out.append((item.path, k.quoted, getattr(k, "options", None), getattr(k, "int_digits", None),
                        getattr(k, "frac_digits", None), getattr(k, "max_tokens", None)))
    return out


def test_json_kinds_check_values_both_ways() -> None:
    number = BoundedNumber(2, 1, minimum=0.0, maximum=12.5)
    assert number.format_value(12.5, "n") == "+12.5"
    with pytest.raises(SchemaError, match=r"^n: .*outside \[0, 12\.5\]"):
        number.format_value(12.6, "n")
    with pytest.raises(SchemaError, match="expected a number"):
        number.format_value(True, "n")
    with pytest.raises(SlotValueError, match=r"outside \[0, 12\.5\]"):
        number.parse_value("-00.5")
    exclusive = BoundedNumber(1, 0, minimum=0.0, maximum=5.0, exclusive_minimum=True, integer=True)
    assert exclusive.parse_value("+5") == 5 and isinstance(exclusive.parse_value("+5"), int)
    with pytest.raises(SlotValueError):
        exclusive.parse_value("+0")
    with pytest.raises(SchemaError, match="expected an integer"):
        exclusive.format_value(2.5, "i")
    text = BoundedText(8, min_length=2, max_length=5)
    assert text.parse_value("abcde") == "abcde"
    with pytest.raises(SlotValueError, match="longer than maxLength 5") as info:
        text.parse_value("abcdef")
    assert info.value.offset == 5
    with pytest.raises(SlotValueError, match="shorter than minLength 2"):
        text.parse_value("a")
    with pytest.raises(SchemaError, match="longer than maxLength"):
        text.format_value("toolong", "t")
    flag = JsonBoolean()
    assert (flag.parse_value("true"), flag.parse_value("false")) == (True, False)
    assert flag.scan("true,x", 0) == 4 and flag.scan("false]}", 0) == 5
    with pytest.raises(SlotValueError) as bad:
        flag.parse_value("tru3")
    assert bad.value.offset == 3
    with pytest.raises(SchemaError, match="expected a bool"):
        flag.format_value("true", "f")
    pair = ArrayPart((flag, number))
    with pytest.raises(SchemaError, match="expected 2 items, got 1"):
        pair.format_slots([True], "p")
    with pytest.raises(SchemaError, match="expected an array"):
        pair.format_slots("ab", "p")
    const = ConstPart.of({"v": [1, "x"]})
    assert const.text == '{"v":[1,"x"]}' and const.assemble([]) == {"v": [1, "x"]}
    with pytest.raises(SchemaError, match="expected the constant"):
        const.format_slots({"v": [2, "x"]}, "c")


def test_parse_names_the_slot_of_a_wrongly_typed_value() -> None:
    schema = compile_schema(DETECTIONS)
    value = VALUES[1][1]
    text = schema.render(value)
    cases = [
        (text.replace('"occluded":true', '"occluded":yes'), "boxes.1.occluded"),
        (text.replace('"count":+2', '"count":+5'), "count"),  # out of range
        (text.replace('"label":"car"', '"label":"bus"'), "boxes.0.label"),
        (text.replace('"score":+0.98', '"score":+0.9x'), "boxes.0.score"),
    ]
    for bad, field in cases:
        with pytest.raises(PlanParseError) as info:
            schema.parse(bad, null_text=NULL_TEXT)
        assert info.value.field == field, bad
    long = compile_schema(obj(t={"type": "string", "maxLength": 3}))
    with pytest.raises(PlanParseError, match="longer than maxLength 3") as info:
        long.parse('{"t":"abcd"}', null_text=NULL_TEXT)
    assert (info.value.field, info.value.offset) == ("t", 9)


BIG = 10**12
REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    ("not an object at top", arr(2, {"type": "boolean"}), "", "top level"),
    ("optional property", {**obj(a={"type": "boolean"}), "required": []}, "/properties/a", "optional"),
    ("open object", {**obj(a={"type": "boolean"}), "additionalProperties": True}, "/additionalProperties", "false"),
    ("schema-valued extra", {**obj(a={"type": "boolean"}), "additionalProperties": {"type": "string"}},
     "/additionalProperties", "false"),
    ("unbounded array", obj(t={"type": "array", "items": {"type": "boolean"}}), "/properties/t", "minItems"),
    ("unequal lengths", obj(t={"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "boolean"}}),
     "/properties/t", "minItems == maxItems"),
    ("deep unbounded", obj(trajectory=arr(2, {"type": "array", "items": num(0, 1)})),
     "/properties/trajectory/items", "fixed length"),
    ("number without maximum", obj(x={"type": "number", "minimum": 0, "multipleOf": 0.1}),
     "/properties/x", "maximum"),
    ("number without multipleOf", obj(x={"type": "number", "minimum": 0, "maximum": 1}), "/properties/x",
     "multipleOf"),
    ("odd multipleOf", obj(x=num(0, 1, 0.25)), "/properties/x/multipleOf", "power of ten"),
    ("too wide", obj(x=num(-BIG, BIG, 1)), "/properties/x", "at most 9"),
    ("oneOf", obj(x={"oneOf": [{"type": "boolean"}, num(0, 1)]}), "/properties/x/oneOf", "oneOf"),
    ("anyOf", obj(x={"anyOf": [{"type": "boolean"}]}), "/properties/x/anyOf", "anyOf"),
    ("pattern", obj(s={"type": "string", "maxLength": 4, "pattern": "^a+$"}), "/properties/s/pattern",
     "pattern"),
    ("string without maxLength", obj(s={"type": "string"}), "/properties/s", "maxLength"),
    ("non-identifier key", obj(**{"a b": {"type": "boolean"}}), "/properties/a b", "identifier"),
    ("pointer escaping", obj(**{"a/b": {"type": "boolean"}}), "/properties/a~1b", "identifier"),
    ("nullable", obj(x={"type": ["number", "null"]}), "/properties/x/type", "null"),
    ("null", obj(x={"type": "null"}), "/properties/x/type", "null"),
    ("mixed enum", obj(x={"enum": ["a", 1]}), "/properties/x/enum", "strings"),
    ("quoted enum", obj(x={"enum": ['say "hi"']}), "/properties/x/enum", "quotes"),
    ("no type", obj(x={"description": "anything"}), "/properties/x", "type"),
    ("true schema", obj(x=True), "/properties/x", "fixed structure"),
    ("remote ref", obj(x={"$ref": "https://example.com/s.json"}), "/properties/x/$ref", "local"),
    ("dangling ref", obj(x={"$ref": "#/$defs/nope"}), "/properties/x/$ref", "points at nothing"),
    ("recursive ref", {**obj(x={"$ref": "#/$defs/node"}), "$defs": {"node": obj(next={"$ref": "#/$defs/node"})}},
     "/$defs/node/properties/next/$ref", "recursive"),
    ("error inside a definition", {**obj(x={"$ref": "#/$defs/p"}), "$defs": {"p": {"type": "string"}}},
     "/$defs/p", "maxLength"),
    ("only consts", obj(x={"const": 1}), "", "no value slots"),
    ("prefixItems then more", obj(t={"type": "array", "prefixItems": [{"type": "boolean"}],
                                     "items": {"type": "boolean"}}), "/properties/t/items", "false"),
    ("exclusive draft-04 style", obj(x={"type": "integer", "minimum": 0, "maximum": 9, "exclusiveMaximum": True}),
     "/properties/x", "not both"),
    ("empty object", obj(), "/properties", "non-empty"),
]


@pytest.mark.parametrize(("case", "document", "pointer", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_their_json_pointer(case: str, document: dict[str, Any], pointer: str, reason: str) -> None:
    with pytest.raises(JsonSchemaError) as info:
        compile_schema(document, "actions.json")
    assert info.value.pointer == pointer
    assert str(info.value).startswith(f"actions.json#{pointer}: ")
    assert reason in info.value.reason
    assert isinstance(info.value, SchemaError)


# --- hypothesis: random documents within the subset, with values drawn to fit them -------------------

WORDS = ("car", "truck", "left", "right", "keep speed", "stop", "go-slow", "x1", "ünï")
TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="<|"), max_size=6)
NodeAndValues = tuple[dict[str, Any], st.SearchStrategy[Any]]


@st.composite
def leaf(draw: st.DrawFn) -> NodeAndValues:
    kind = draw(st.sampled_from(["enum", "boolean", "number", "integer", "string", "const"]))
    if kind == "enum":
        options = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4, unique=True))
        return {"enum": options}, st.sampled_from(options)
    if kind == "boolean":
        return {"type": "boolean"}, st.booleans()
    if kind in ("number", "integer"):
        frac = 0 if kind == "integer" else draw(st.integers(0, 3))
        lo = draw(st.integers(-999, 999))
        hi = draw(st.integers(lo, 999))
        step = 10.0 ** -frac
        node: dict[str, Any] = {"type": kind, "minimum": round(lo * step, frac), "maximum": round(hi * step, frac)}
        if kind == "number":
            node["multipleOf"] = round(step, frac)
            return node, st.integers(lo, hi).map(lambda u: round(u * step, frac))
        return node, st.integers(lo, hi)
    if kind == "string":
        # Escapes at most double a character, so maxLength // 2 printable ASCII always fits the token budget.
        size = draw(st.integers(1, 12))
        return {"type": "string", "maxLength": size}, TEXT.map(lambda t: t[: size // 2])
    value = draw(st.one_of(st.sampled_from(WORDS), st.integers(-5, 5), st.booleans(), st.just([1, "a"])))
    return {"const": value}, st.just(value)


def node(depth: int) -> st.SearchStrategy[NodeAndValues]:
    if depth == 0:
        return leaf()
    return st.one_of(leaf(), obj_node(depth), array_node(depth))


@st.composite
def obj_node(draw: st.DrawFn, depth: int, first_slot: bool = False) -> NodeAndValues:
    keys = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True), min_size=1, max_size=3,
                         unique=True))
    parts = [draw(node(depth - 1)) for _ in keys]
    if first_slot:  # at least one value slot: the first property is a boolean
        parts[0] = ({"type": "boolean"}, st.booleans())
    document = obj(**{k: p[0] for k, p in zip(keys, parts, strict=True)})
    return document, st.fixed_dictionaries({k: p[1] for k, p in zip(keys, parts, strict=True)})


@st.composite
def array_node(draw: st.DrawFn, depth: int) -> NodeAndValues:
    if draw(st.booleans()):
        n = draw(st.integers(1, 3))
        item, values = draw(node(depth - 1))
        return arr(n, item), st.lists(values, min_size=n, max_size=n)
    parts = draw(st.lists(node(depth - 1), min_size=1, max_size=3))
    return {"type": "array", "prefixItems": [p[0] for p in parts]}, st.tuples(*(p[1] for p in parts)).map(list)


@st.composite
def document_and_value(draw: st.DrawFn) -> tuple[dict[str, Any], Any]:
    document, values = draw(obj_node(2, first_slot=True))
    return document, draw(values)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document_and_value())
def test_generated_schemas_round_trip_through_the_scaffold(tok: Tokenizer, case: tuple[dict[str, Any], Any]) -> None:
    document, value = case
    schema = compile_schema(json.loads(json.dumps(document)))  # as read from a file
    text = schema.render(value)
    assert schema.parse(text, null_text=NULL_TEXT) == value
    scaffold = build_scaffold(schema, tok)
    ids = scaffold.encode_plan(value)
    assert scaffold.decode_plan(ids) == value
    assert len(scaffold) == len(build_scaffold(schema, tok).token_ids)  # the length does not depend on the value


def test_cli_scaffold_prints_a_json_schema_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "pick.json"
    good.write_text(json.dumps(PICK_PLACE))
    assert main(["scaffold", "--schema", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith('{"action":"pick_place","object":"<object:') and "<chunk.2.3:" in out
    assert load_json_schema(good).document == PICK_PLACE
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj(t={"type": "array", "items": {"type": "boolean"}})))
    assert main(["scaffold", "--schema", str(bad)]) == 2
    assert f"{bad}#/properties/t: an array needs minItems == maxItems" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["scaffold", "--schema", str(broken)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert main(["scaffold", "--schema", str(tmp_path / "missing.json")]) == 2
    assert "neither a preset" in capsys.readouterr().err
