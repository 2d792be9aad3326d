"""The strict answer parser under fuzzing: only PlanParseError escapes; valid answers round-trip."""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockpilot.vla.answer_parser import PlanParseError, parse_plan, try_parse_plan
from blockpilot.vla.plans import (
    DRIVING_PRESETS,
    DrivingPlan,
    DrivingSchema,
    RobotActionPlan,
    RobotActionSchema,
    render_plan,
)
from blockpilot.vla.reference_tokenizer import END_TEXT, NULL_TEXT, SPECIAL_TEXTS, build_reference_tokenizer
from blockpilot.vla.tokenizer import Tokenizer

SCHEMAS: dict[str, DrivingSchema | RobotActionSchema] = {
    "nuscenes": DRIVING_PRESETS["nuscenes"],
    "wod_e2e": DRIVING_PRESETS["wod_e2e"],
    "robot": RobotActionSchema(num_waypoints=4),
}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Characters that keep mutated answers close to valid ones, so fuzzing reaches deep into the parser.
NEAR_MISS = st.sampled_from([*'{}[]":,+-.\\0123456789 yesnoptu_', "\x00", "é", "\ufffd", NULL_TEXT])
NEAR_MISS_TEXT = st.lists(NEAR_MISS, max_size=300).map("".join)


def _free_text() -> st.SearchStrategy[str]:
    # NFC so the tokenizer round trip is exact; no special-token text, which the parser strips.
    return st.text(max_size=60).map(lambda s: unicodedata.normalize("NFC", s)).filter(
        lambda s: not any(t in s for t in SPECIAL_TEXTS))


def _coords(number_digits: tuple[int, int], rows: int, dims: int) -> st.SearchStrategy[np.ndarray]:
    # Values on the format's grid, so a round trip must reproduce them exactly.
    int_digits, frac_digits = number_digits
    limit = 10 ** (int_digits + frac_digits) - 1
    coord = st.integers(-limit, limit).map(lambda k: k / 10**frac_digits)
    return st.lists(st.lists(coord, min_size=dims, max_size=dims), min_size=rows, max_size=rows).map(np.array)


def plans(schema: DrivingSchema | RobotActionSchema) -> st.SearchStrategy[DrivingPlan | RobotActionPlan]:
    if isinstance(schema, DrivingSchema):
        return st.builds(
            DrivingPlan,
            waypoints=_coords((schema.int_digits, schema.frac_digits), schema.num_waypoints, 2),
            longitudinal=st.sampled_from(schema.longitudinal_options),
            lateral=st.sampled_from(schema.lateral_options),
            critical_objects=st.fixed_dictionaries({k: st.booleans() for k in schema.critical_object_keys}),
            explanation=_free_text(),
        )
    return st.builds(
        RobotActionPlan,
        subtask=_free_text(),
        gripper=st.sampled_from(schema.gripper_options),
        waypoints=_coords((schema.int_digits, schema.frac_digits), schema.num_waypoints, 3),
    )


def schemas_and_texts() -> st.SearchStrategy[tuple[str, str]]:
    """(schema name, canonical answer text of a generated plan)."""
    return st.sampled_from(sorted(SCHEMAS)).flatmap(
        lambda name: plans(SCHEMAS[name]).map(lambda plan: (name, render_plan(SCHEMAS[name], plan))))


def _fields(schema: DrivingSchema | RobotActionSchema) -> set[str]:
    return {s.path for s in schema.layout.slots} | set(schema.layout.keys) | {"answer"}


def _parse_or_error(text: str, name: str) -> object:
    """Parse; a malformed answer must raise PlanParseError (anything else fails the test)."""
    schema = SCHEMAS[name]
    try:
        return parse_plan(text, schema, null_text=NULL_TEXT)
    except PlanParseError as exc:
        assert isinstance(exc, ValueError)
        assert 0 <= exc.offset <= len(text), (exc.offset, len(text))
        assert exc.field in _fields(schema), exc.field
        return exc


def _assert_same(a: object, b: object) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y, f.name


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_reference_tokenizer()[0]


@FUZZ
@given(data=st.data(), name=st.sampled_from(sorted(SCHEMAS)))
def test_generated_plans_round_trip(tok: Tokenizer, data: st.DataObject, name: str) -> None:
    schema = SCHEMAS[name]
    plan = data.draw(plans(schema))
    text = render_plan(schema, plan)
    parsed = parse_plan(text, schema, null_text=NULL_TEXT)
    _assert_same(parsed, plan)
    assert render_plan(schema, parsed) == text
    # Through the tokenizer and back, and with an end token after the answer.
    via_tokens = tok.decode(tok.encode(text + END_TEXT))
    _assert_same(parse_plan(via_tokens, schema, null_text=NULL_TEXT, end_text=END_TEXT), plan)


@FUZZ
@given(case=schemas_and_texts(), cuts=st.lists(st.integers(0, 10_000), min_size=1, max_size=6))
def test_padding_anywhere_is_ignored(case: tuple[str, str], cuts: list[int]) -> None:
    name, text = case
    padded = text
    for cut in sorted({c % (len(text) + 1) for c in cuts}, reverse=True):
        padded = padded[:cut] + NULL_TEXT * 2 + padded[cut:]
    _assert_same(parse_plan(padded, SCHEMAS[name], null_text=NULL_TEXT),
                 parse_plan(text, SCHEMAS[name], null_text=NULL_TEXT))


@FUZZ
@given(name=st.sampled_from(sorted(SCHEMAS)),
       text=st.one_of(st.text(max_size=300), NEAR_MISS_TEXT))
def test_random_text_raises_only_plan_parse_error(name: str, text: str) -> None:
    assert isinstance(_parse_or_error(text, name), PlanParseError)


@FUZZ
@given(case=schemas_and_texts(), cut=st.integers(0, 10_000), pad=st.booleans())
def test_truncated_answers_are_rejected(case: tuple[str, str], cut: int, pad: bool) -> None:
    name, text = case
    short = text[: cut % len(text)] + (NULL_TEXT if pad else "")
    err = _parse_or_error(short, name)
    assert isinstance(err, PlanParseError)


@FUZZ
@given(case=schemas_and_texts(), where=st.integers(0, 10_000), op=st.sampled_from(["replace", "insert", "delete"]),
       char=st.one_of(NEAR_MISS, st.characters()))
def test_single_character_edits_never_escape(case: tuple[str, str], where: int, op: str, char: str) -> None:
    name, text = case
    at = where % len(text)
    edited = {"replace": text[:at] + char + text[at + 1:], "insert": text[:at] + char + text[at:],
              "delete": text[:at] + text[at + 1:]}[op]
    result = _parse_or_error(edited, name)
    if not isinstance(result, PlanParseError):
        # A harmless edit (a digit, a letter of the explanation) must still give a renderable plan.
        assert parse_plan(render_plan(SCHEMAS[name], result), SCHEMAS[name], null_text=NULL_TEXT)  # type: ignore[arg-type]


@FUZZ
@given(case=schemas_and_texts(), where=st.integers(0, 10_000),
       junk=st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=8))
def test_random_unicode_insertions_never_escape(case: tuple[str, str], where: int, junk: str) -> None:
    # Any code point, lone surrogates included.
    name, text = case
    at = where % (len(text) + 1)
    _parse_or_error(text[:at] + junk + text[at:], name)


def _nuscenes_text(**changes: object) -> str:
    schema = DRIVING_PRESETS["nuscenes"]
    plan = DrivingPlan(waypoints=np.arange(12.0).reshape(6, 2), longitudinal="stop", lateral="straight",
                       critical_objects={k: False for k in schema.critical_object_keys}, explanation="ok")
    return render_plan(schema, dataclasses.replace(plan, **changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(("old", "new", "field", "reason", "delta"), [
    ('"lateral":"straight"', '"lateral":"sideways"', "future_meta_behavior.lateral", "not one of", 11),
    ('"pedestrian"', '"pedestrians"', "critical_objects.pedestrian", "expected", 11),
    ('"cyclist":"no"', '"cyclist":"maybe"', "critical_objects.cyclist", "not one of", 11),
    ("[+10.00,+11.00]]", "]", "trajectory.5.0", "expected", 0),
    ("+11.00]]", "+11.00],[+12.00,+13.00]]", "trajectory", "expected", 7),
    ("]]}", "]]}]", "answer", "unexpected text", 3),
    ("+03.00", "+3.00", "trajectory.1.1", "format", 2),
    ('"explanation":"ok"', '"explanation": "ok"', "explanation", "expected", 14),
    ('"explanation":"ok"', '"explanation":"o\\k"', "explanation", "invalid JSON", 16),
])
def test_errors_name_field_and_offset(old: str, new: str, field: str, reason: str, delta: int) -> None:
    text = _nuscenes_text()
    assert text.count(old) == 1
    broken = text.replace(old, new)
    with pytest.raises(PlanParseError, match=reason) as info:
        parse_plan(broken, DRIVING_PRESETS["nuscenes"], null_text=NULL_TEXT)
    assert (info.value.field, info.value.offset) == (field, text.index(old) + delta)


def test_offsets_refer_to_the_text_as_given() -> None:
    text = _nuscenes_text().replace('"lateral":"straight"', '"lateral":"sideways"')
    padded = NULL_TEXT * 3 + text
    with pytest.raises(PlanParseError) as info:
        parse_plan(padded, DRIVING_PRESETS["nuscenes"], null_text=NULL_TEXT)
    assert padded[info.value.offset:].startswith("sideways")


def test_try_parse_plan_returns_instead_of_raising() -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    good = try_parse_plan(_nuscenes_text(), schema, null_text=NULL_TEXT)
    assert isinstance(good, DrivingPlan) and good.longitudinal == "stop"
    bad = try_parse_plan("{", schema, null_text=NULL_TEXT)
    assert isinstance(bad, PlanParseError) and bad.field == "critical_objects.nearby_vehicle"
    assert isinstance(try_parse_plan(b"{}", schema, null_text=NULL_TEXT), PlanParseError)  # type: ignore[arg-type]
    assert isinstance(try_parse_plan(_nuscenes_text() + "x", schema, null_text=NULL_TEXT, end_text="x"), DrivingPlan)
