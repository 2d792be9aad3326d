"""Token scaffolds: frozen structure, fixed slot spans, plan encoding and reading back."""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from blockpilot.vla.answer_parser import PlanParseError, parse_plan
from blockpilot.vla.config import SpecialTokens
from blockpilot.vla.plans import (
    CRITICAL_OBJECT_KEYS,
    DRIVING_PRESETS,
    DrivingPlan,
    DrivingSchema,
    RobotActionPlan,
    RobotActionSchema,
    render_plan,
)
from blockpilot.vla.reference_tokenizer import NULL_TEXT, SPECIAL_TEXTS, build_reference_tokenizer, reference_corpus
from blockpilot.vla.scaffold import Scaffold, build_scaffold
from blockpilot.vla.schema import FixedNumber, FreeText, SchemaError, Slot, Structure
from blockpilot.vla.tokenizer import Tokenizer

SCHEMAS = {"nuscenes": DRIVING_PRESETS["nuscenes"], "wod_e2e": DRIVING_PRESETS["wod_e2e"],
           "robot": RobotActionSchema()}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_reference_tokenizer()[0]


def _driving_plan(schema: DrivingSchema, explanation: str = "A cyclist merges from the right, so slow down.",
                  longitudinal: str = "decelerate", flagged: tuple[str, ...] = ("cyclist",)) -> DrivingPlan:
    n = schema.num_waypoints
    x = np.linspace(1.5, 1.5 * n, n)
    return DrivingPlan(waypoints=np.stack([x, -0.01 * x**2], axis=1), longitudinal=longitudinal,
                       lateral="right_lane_change", critical_objects={k: k in flagged for k in CRITICAL_OBJECT_KEYS},
                       explanation=explanation)


def _robot_plan(schema: RobotActionSchema, subtask: str = "place the blue cup on the shelf") -> RobotActionPlan:
    k = schema.num_waypoints
    points = np.stack([np.linspace(0.1, 0.5, k), np.linspace(-0.2, 0.2, k), np.full(k, 0.35)], axis=1)
    return RobotActionPlan(subtask=subtask, gripper="close", waypoints=points)


def _plan(name: str, **kw: str) -> object:
    schema = SCHEMAS[name]
    if isinstance(schema, DrivingSchema):
        return _driving_plan(schema, **kw)
    assert isinstance(schema, RobotActionSchema)
    return _robot_plan(schema, **kw)


def _assert_same(a: object, b: object) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            np.testing.assert_allclose(x, y, atol=1e-9)
        else:
            assert x == y, f.name


def _quantized(schema: object, plan: object) -> object:
    frac = schema.layout.slots[-1].kind.frac_digits
    return dataclasses.replace(plan, waypoints=np.round(plan.waypoints, frac))


@pytest.mark.parametrize("name", SCHEMAS)
def test_frozen_positions_hold_the_template_tokens(tok: Tokenizer, name: str) -> None:
    scaffold = build_scaffold(SCHEMAS[name], tok)
    special = tok.special
    pos = 0
    slots = iter(scaffold.slots)
    for item in SCHEMAS[name].layout.template:
        if isinstance(item, Structure):
            expected = tok.encode(item.text)
            assert scaffold.token_ids[pos: pos + len(expected)].tolist() == expected
            assert scaffold.frozen[pos: pos + len(expected)].all()
            pos += len(expected)
        else:
            assert isinstance(item, Slot)
            span = next(slots)
            assert (span.path, span.start) == (item.path, pos)
            assert not scaffold.frozen[span.start: span.end].any()
            assert (scaffold.token_ids[span.start: span.end] == special.mask).all()
            pos = span.end
    assert pos == len(scaffold)
    assert np.array_equal(scaffold.frozen, scaffold.token_ids != special.mask)
    assert not scaffold.token_ids.flags.writeable and not scaffold.frozen.flags.writeable


@pytest.mark.parametrize("name", SCHEMAS)
def test_sections_tile_the_sequence_in_causal_order(tok: Tokenizer, name: str) -> None:
    schema = SCHEMAS[name]
    scaffold = build_scaffold(schema, tok)
    assert [s.key for s in scaffold.sections] == list(schema.layout.keys)
    assert scaffold.sections[0].start == 0 and scaffold.sections[-1].end == len(scaffold)
    for before, after in zip(scaffold.sections, scaffold.sections[1:], strict=False):
        assert before.end == after.start
    for span in scaffold.slots:
        section = next(s for s in scaffold.sections if s.key == span.path.split(".")[0])
        assert section.start <= span.start and span.end <= section.end


def test_slot_lengths_do_not_depend_on_values(tok: Tokenizer) -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    scaffold = build_scaffold(schema, tok)
    short = _driving_plan(schema, explanation="Stop.", longitudinal="stop", flagged=())
    long = _driving_plan(schema, explanation="A school bus waits at the crosswalk near a school, so keep speed.",
                         longitudinal="keep_speed", flagged=CRITICAL_OBJECT_KEYS)
    for plan in (short, long):
        ids = scaffold.encode_plan(plan)
        assert ids.shape == scaffold.token_ids.shape
        assert np.array_equal(ids[scaffold.frozen], scaffold.token_ids[scaffold.frozen])
        assert not (ids == tok.special.mask).any()
    assert scaffold.slot("explanation").length == schema.explanation_tokens
    # Qwen2-style splitting: one token per character of a number, so numbers never need padding.
    number = scaffold.slot("trajectory.0.0")
    assert isinstance(number.kind, FixedNumber) and number.length == number.kind.width
    assert scaffold.slot("future_meta_behavior.longitudinal").length == max(
        len(tok.encode(o)) for o in schema.longitudinal_options)


def test_values_sit_in_their_slots_padded_with_null(tok: Tokenizer) -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    scaffold = build_scaffold(schema, tok)
    plan = _driving_plan(schema, explanation="Stop.")
    ids = scaffold.encode_plan(plan)
    span = scaffold.slot("explanation")
    value = tok.encode("Stop.")
    assert ids[span.start: span.start + len(value)].tolist() == value
    assert (ids[span.start + len(value): span.end] == tok.special.null).all()
    slots = scaffold.read_slots(ids)
    assert slots["explanation"] == "Stop."
    assert slots["critical_objects.cyclist"] == "yes" and slots["critical_objects.animal"] == "no"
    assert slots["trajectory.0.0"] == "+01.50" and slots["trajectory.1.1"] == "-00.09"
    mask_text = tok.token_text(tok.special.mask)
    assert all(text and not text.replace(mask_text, "") for text in scaffold.read_slots(scaffold.token_ids).values())


@pytest.mark.parametrize("name", SCHEMAS)
def test_plan_tokens_text_plan_round_trip(tok: Tokenizer, name: str) -> None:
    schema = SCHEMAS[name]
    scaffold: Scaffold[object] = build_scaffold(schema, tok)
    plan = _plan(name)
    ids = scaffold.encode_plan(plan)
    text = tok.decode(ids)
    assert NULL_TEXT in text
    _assert_same(parse_plan(text, schema, null_text=NULL_TEXT), _quantized(schema, plan))
    _assert_same(scaffold.decode_plan(ids), _quantized(schema, plan))
    # Dropping special tokens while decoding removes the padding too.
    assert tok.decode(ids, skip_special_tokens=True) == render_plan(schema, _quantized(schema, plan))


@pytest.mark.parametrize("name", SCHEMAS)
def test_plan_text_tokens_text_plan_round_trip(tok: Tokenizer, name: str) -> None:
    schema = SCHEMAS[name]
    plan = _plan(name)
    text = render_plan(schema, plan)
    again = tok.decode(tok.encode(text))
    assert again == text
    _assert_same(parse_plan(again, schema, null_text=NULL_TEXT), _quantized(schema, plan))


@pytest.mark.parametrize("explanation", ["é" * 300, "🚗" * 100, "\\" * 200, '"quoted" ' * 40, "世界" * 100,
                                         "stop " * 100 + "🚗"])
def test_long_free_text_is_cut_at_a_clean_token_boundary(tok: Tokenizer, explanation: str) -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    scaffold = build_scaffold(schema, tok)
    ids = scaffold.encode_plan(_driving_plan(schema, explanation=explanation))
    parsed = scaffold.decode_plan(ids)
    assert explanation.startswith(parsed.explanation)
    assert "\ufffd" not in parsed.explanation
    span = scaffold.slot("explanation")
    used = int((ids[span.start: span.end] != tok.special.null).sum())
    assert used > span.length - 4  # cut close to the slot's end, not emptied
    assert len(parsed.explanation) > 0


@pytest.fixture(scope="module")
def nuscenes_scaffold(tok: Tokenizer) -> Scaffold[DrivingPlan]:
    return build_scaffold(DRIVING_PRESETS["nuscenes"], tok)


@settings(max_examples=40, deadline=None)
@given(explanation=st.text(max_size=120))
def test_any_explanation_encodes_to_a_prefix(tok: Tokenizer, nuscenes_scaffold: Scaffold[DrivingPlan],
                                             explanation: str) -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    plan = _driving_plan(schema, explanation=explanation)
    normalized = unicodedata.normalize("NFC", explanation)
    if any(t in normalized for t in SPECIAL_TEXTS):
        with pytest.raises(SchemaError, match="contains special token"):
            nuscenes_scaffold.encode_plan(plan)
        return
    parsed = nuscenes_scaffold.decode_plan(nuscenes_scaffold.encode_plan(plan))
    assert normalized.startswith(parsed.explanation)
    if len(tok.encode(FreeText(1).format_value(explanation, "e"))) <= schema.explanation_tokens:
        assert parsed.explanation == normalized


def test_decode_plan_names_the_broken_slot(tok: Tokenizer) -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    scaffold = build_scaffold(schema, tok)
    with pytest.raises(PlanParseError) as info:
        scaffold.decode_plan(scaffold.token_ids)  # nothing filled in yet
    assert info.value.field == "critical_objects.nearby_vehicle"
    ids = scaffold.encode_plan(_driving_plan(schema))
    broken = ids.copy()
    broken[scaffold.slot("trajectory.2.1").start + 2] = tok.encode("x")[0]
    with pytest.raises(PlanParseError) as info:
        scaffold.decode_plan(broken)
    assert info.value.field == "trajectory.2.1"
    broken = ids.copy()
    broken[scaffold.slot("future_meta_behavior.lateral").start] = tok.vocab_size + 3
    with pytest.raises(PlanParseError, match="outside the tokenizer's vocabulary") as info:
        scaffold.decode_plan(broken)
    assert info.value.field == "future_meta_behavior.lateral"
    broken = ids.copy()
    broken[scaffold.sections[-1].start] = tok.vocab_size
    with pytest.raises(PlanParseError) as info:
        scaffold.decode_plan(broken)
    assert info.value.field == "trajectory"
    with pytest.raises(ValueError, match="expected"):
        scaffold.decode_plan(ids[:-1])


def test_value_holding_a_special_token_is_rejected(tok: Tokenizer) -> None:
    schema = DRIVING_PRESETS["nuscenes"]
    scaffold = build_scaffold(schema, tok)
    with pytest.raises(SchemaError, match=r"^explanation: .*special token"):
        scaffold.encode_plan(_driving_plan(schema, explanation=f"sneaky {NULL_TEXT} padding"))


def _digit_merging_tokenizer() -> Tokenizer:
    # GPT-2-style splitting keeps digit runs together, so numbers take a varying token count.
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<end>", "<mask>", "<null>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(reference_corpus(seed=1), trainer=trainer)
    return Tokenizer(backend, SpecialTokens(end=0, mask=1, null=2))


@pytest.mark.parametrize("name", SCHEMAS)
def test_another_tokenizer_works_too(name: str) -> None:
    other = _digit_merging_tokenizer()
    schema = SCHEMAS[name]
    scaffold: Scaffold[object] = build_scaffold(schema, other)
    plan = _plan(name)
    ids = scaffold.encode_plan(plan)
    numbers = [span for span in scaffold.slots if isinstance(span.kind, FixedNumber)]
    assert any((ids[span.start: span.end] == other.special.null).any() for span in numbers)
    _assert_same(scaffold.decode_plan(ids), _quantized(schema, plan))
    text = other.decode(ids)
    _assert_same(parse_plan(text, schema, null_text="<null>"), _quantized(schema, plan))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_slot_tokens_give_a_plan_or_a_parse_error(tok: Tokenizer, nuscenes_scaffold: Scaffold[DrivingPlan],
                                                          data: st.DataObject) -> None:
    # What a half-trained or quantized model may write into the slots; ids past the vocabulary included.
    ids = nuscenes_scaffold.encode_plan(_driving_plan(DRIVING_PRESETS["nuscenes"])).copy()
    open_positions = np.flatnonzero(~nuscenes_scaffold.frozen)
    chosen = data.draw(st.lists(st.sampled_from(open_positions.tolist()), min_size=1, max_size=12))
    for pos in chosen:
        ids[pos] = data.draw(st.integers(0, tok.vocab_size + 8))
    try:
        nuscenes_scaffold.decode_plan(ids)
    except PlanParseError as exc:
        assert exc.field == "answer" or exc.field.split(".")[0] in DRIVING_PRESETS["nuscenes"].layout.keys
