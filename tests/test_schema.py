"""Schema parts, layouts and the driving / robot schemas: formats, validation, canonical text."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from blockpilot.vla.plans import (
    CRITICAL_OBJECT_KEYS,
    DRIVING_PRESETS,
    DrivingPlan,
    DrivingSchema,
    RobotActionPlan,
    RobotActionSchema,
    render_plan,
)
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


@pytest.mark.parametrize(("value", "text"), [
    (14.7, "+14.70"), (-0.04, "-00.04"), (0.0, "+00.00"), (-0.0, "+00.00"), (-0.001, "+00.00"),
    (99.99, "+99.99"), (-99.99, "-99.99"), (3.14159, "+03.14"), (np.float32(2.5), "+02.50"), (7, "+07.00"),
])
def test_fixed_number_format(value: float, text: str) -> None:
    number = FixedNumber(2, 2)
    assert number.format_value(value, "x") == text
    assert len(text) == number.width == 6
    assert number.parse_value(text) == pytest.approx(round(float(value), 2), abs=1e-9)


def test_fixed_number_other_widths() -> None:
    assert FixedNumber(3, 2).format_value(-123.456, "x") == "-123.46"
    assert FixedNumber(3, 0).format_value(5, "x") == "+005"
    assert FixedNumber(1, 3).format_value(0.5, "x") == "+0.500"
    assert FixedNumber(3, 0).parse_value("-042") == -42.0


@pytest.mark.parametrize("value", [99.995, 100.0, -100.0, 1e9, math.nan, math.inf, -math.inf, "abc", None])
def test_fixed_number_rejects_values_it_cannot_write(value: object) -> None:
    with pytest.raises(SchemaError, match=r"^trajectory\.2\.0: "):
        FixedNumber(2, 2).format_value(value, "trajectory.2.0")


@pytest.mark.parametrize(("raw", "offset"), [
    ("14.700", 0), ("+1a.70", 2), ("+14,70", 3), ("+14.7", 5), ("", 0), ("+١٤.70", 1), ("+14.7-", 5),
])
def test_fixed_number_parse_names_the_bad_character(raw: str, offset: int) -> None:
    with pytest.raises(SlotValueError) as info:
        FixedNumber(2, 2).parse_value(raw)
    assert info.value.offset == offset


@pytest.mark.parametrize(("int_digits", "frac_digits"), [(0, 2), (10, 2), (2, -1), (2, 7), (2.0, 2)])
def test_fixed_number_validates_widths(int_digits: int, frac_digits: int) -> None:
    with pytest.raises(SchemaError):
        FixedNumber(int_digits, frac_digits)


@pytest.mark.parametrize("options", [(), ("",), ("a", "a"), ('say "hi"',), ("back\\slash",), (" padded",),
                                     ("new\nline",)])
def test_categorical_validates_options(options: tuple[str, ...]) -> None:
    with pytest.raises(SchemaError):
        Categorical(options)


def test_categorical_values() -> None:
    kind = Categorical(("open", "close"))
    assert kind.format_value("open", "gripper") == "open"
    with pytest.raises(SchemaError, match=r"^gripper: 'opened' is not one of"):
        kind.format_value("opened", "gripper")
    with pytest.raises(SlotValueError):
        kind.parse_value("opened")


def test_free_text_escapes_and_unescapes() -> None:
    kind = FreeText(8)
    for text in ['say "stop"', "back\\slash", "two\nlines\t", "ünïcödé 世界 🚗", ""]:
        raw = kind.format_value(text, "explanation")
        assert '"' not in raw.replace('\\"', "")
        assert kind.parse_value(raw) == text
    with pytest.raises(SchemaError, match="not valid Unicode"):
        kind.format_value("lone \ud800 surrogate", "explanation")
    with pytest.raises(SchemaError, match="expected text"):
        kind.format_value(12, "explanation")
    for bad in ["bad \\x escape", "dangling \\", "\\ud800", "raw\ncontrol"]:
        with pytest.raises(SlotValueError):
            kind.parse_value(bad)
    with pytest.raises(SchemaError):
        FreeText(0)


def test_flag_group() -> None:
    group = FlagGroup(("pedestrian", "cyclist"))
    assert group.format_slots({"pedestrian": True, "cyclist": np.bool_(False)}, "co") == ["yes", "no"]
    assert group.assemble(["no", "yes"]) == {"pedestrian": False, "cyclist": True}
    with pytest.raises(SchemaError, match=r"missing keys \['cyclist'\]"):
        group.format_slots({"pedestrian": True}, "co")
    with pytest.raises(SchemaError, match=r"unexpected keys \['dog'\]"):
        group.format_slots({"pedestrian": True, "cyclist": False, "dog": True}, "co")
    with pytest.raises(SchemaError, match=r"^co\.cyclist: expected a bool"):
        group.format_slots({"pedestrian": True, "cyclist": "no"}, "co")
    for keys in [(), ("a.b",), ("ok", "ok"), ("1st",)]:
        with pytest.raises(SchemaError):
            FlagGroup(keys)


def test_waypoint_list() -> None:
    points = WaypointList(2, 3, FixedNumber(1, 1))
    assert points.format_slots([[1, 2, 3], [-1, 0, 0.25]], "w") == \
        ["+1.0", "+2.0", "+3.0", "-1.0", "+0.0", "+0.2"]
    np.testing.assert_array_equal(points.assemble([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(SchemaError, match=r"expected shape \(2, 3\)"):
        points.format_slots([[1, 2, 3]], "w")
    with pytest.raises(SchemaError, match=r"^w\.1\.2: "):
        points.format_slots([[1, 2, 3], [4, 5, 60]], "w")
    with pytest.raises(SchemaError):
        points.format_slots("not numbers", "w")
    with pytest.raises(SchemaError):
        WaypointList(0, 2)


def test_layout_template_and_render() -> None:
    layout = SchemaLayout((
        Section("flags", FlagGroup(("a", "b"))),
        Section("meta", Record((("speed", Categorical(("slow", "fast"))), ("note", FreeText(4))))),
        Section("path", WaypointList(2, 2, FixedNumber(1, 1))),
    ))
    structure = [item.text for item in layout.template if isinstance(item, Structure)]
    assert structure == ['{"flags":{"a":"', '","b":"', '"}', ',"meta":{"speed":"', '","note":"', '"}',
                         ',"path":[[', ",", "],[", ",", "]]}"]
    # Sections partition the template, in order.
    assert layout.section_items[0][0] == 0 and layout.section_items[-1][1] == len(layout.template)
    assert all(a[1] == b[0] for a, b in zip(layout.section_items, layout.section_items[1:], strict=False))
    assert [s.path for s in layout.slots] == ["flags.a", "flags.b", "meta.speed", "meta.note", "path.0.0",
                                              "path.0.1", "path.1.0", "path.1.1"]
    assert all(isinstance(s, Slot) for s in layout.slots)
    values = {"flags": {"a": True, "b": False}, "meta": {"speed": "fast", "note": "hi"},
              "path": [[1.0, -0.5], [2.25, 0.0]]}
    assert layout.render(values) == ('{"flags":{"a":"yes","b":"no"},"meta":{"speed":"fast","note":"hi"},'
                                     '"path":[[+1.0,-0.5],[+2.2,+0.0]]}')
    with pytest.raises(SchemaError, match=r"missing keys \['path'\]"):
        layout.render({"flags": values["flags"], "meta": values["meta"]})
    with pytest.raises(SchemaError, match="duplicate"):
        SchemaLayout((Section("x", FreeText(2)), Section("x", FreeText(2))))


def _driving_plan(schema: DrivingSchema) -> DrivingPlan:
    n = schema.num_waypoints
    return DrivingPlan(
        waypoints=np.stack([np.linspace(2.0, 2.0 * n, n), np.linspace(0.0, -0.04 * (n - 1), n)], axis=1),
        longitudinal="decelerate", lateral="straight",
        critical_objects={k: k == "pedestrian" for k in CRITICAL_OBJECT_KEYS},
        explanation="A pedestrian is crossing ahead.",
    )


def test_driving_presets() -> None:
    nus, wod = DRIVING_PRESETS["nuscenes"], DRIVING_PRESETS["wod_e2e"]
    assert (nus.num_waypoints, nus.rate_hz, nus.horizon_s) == (6, 2.0, 3.0)
    assert (wod.num_waypoints, wod.rate_hz, wod.horizon_s) == (20, 4.0, 5.0)
    np.testing.assert_allclose(nus.waypoint_times_s, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert nus == DrivingSchema.nuscenes() and hash(nus) == hash(DrivingSchema.nuscenes())
    assert nus.layout.keys == ("critical_objects", "explanation", "future_meta_behavior", "trajectory")
    with pytest.raises(dataclasses.FrozenInstanceError):
        nus.num_waypoints = 7


def test_driving_canonical_text() -> None:
    text = render_plan(DrivingSchema.nuscenes(), _driving_plan(DrivingSchema.nuscenes()))
    flags = ",".join(f'"{k}":"{"yes" if k == "pedestrian" else "no"}"' for k in CRITICAL_OBJECT_KEYS)
    assert text == (
        '{"critical_objects":{' + flags + '},"explanation":"A pedestrian is crossing ahead.",'
        '"future_meta_behavior":{"longitudinal":"decelerate","lateral":"straight"},'
        '"trajectory":[[+02.00,+00.00],[+04.00,-00.04],[+06.00,-00.08],[+08.00,-00.12],[+10.00,-00.16],'
        '[+12.00,-00.20]]}'
    )
    wod_text = render_plan(DrivingSchema.wod_e2e(), _driving_plan(DrivingSchema.wod_e2e()))
    assert '"trajectory":[[+002.00,+000.00],' in wod_text and wod_text.endswith(",[+040.00,-000.76]]}")


def test_driving_schema_validation() -> None:
    for bad in [dict(rate_hz=0.0), dict(num_waypoints=0), dict(explanation_tokens=0), dict(int_digits=0),
                dict(longitudinal_options=()), dict(critical_object_keys=("bad key",))]:
        with pytest.raises(SchemaError):
            DrivingSchema(**bad)
    schema = DrivingSchema.nuscenes()
    plan = _driving_plan(schema)
    with pytest.raises(SchemaError, match=r"^trajectory: expected shape \(6, 2\)"):
        render_plan(schema, dataclasses.replace(plan, waypoints=plan.waypoints[:5]))
    with pytest.raises(SchemaError, match=r"^trajectory\.4\.0: 100\.0 is outside"):
        render_plan(schema, dataclasses.replace(plan, waypoints=plan.waypoints * 10))
    with pytest.raises(SchemaError, match=r"^future_meta_behavior\.lateral: 'sideways'"):
        render_plan(schema, dataclasses.replace(plan, lateral="sideways"))


def test_driving_plan_validation() -> None:
    with pytest.raises(SchemaError, match=r"expected shape \(N, 2\)"):
        DrivingPlan(waypoints=np.zeros((3, 3)), longitudinal="stop", lateral="straight", critical_objects={})
    plan = _driving_plan(DrivingSchema.nuscenes())
    with pytest.raises(ValueError, match="read-only"):
        plan.waypoints[0, 0] = 1.0


def test_robot_action_schema() -> None:
    schema = RobotActionSchema(num_waypoints=2)
    plan = RobotActionPlan(subtask="pick up the red cube", gripper="close",
                           waypoints=[[0.1, -0.2, 0.3], [0.0, 0.0, -1.25]])
    assert render_plan(schema, plan) == ('{"subtask":"pick up the red cube","gripper":"close",'
                                         '"waypoints":[[+0.100,-0.200,+0.300],[+0.000,+0.000,-1.250]]}')
    assert schema.layout.keys == ("subtask", "gripper", "waypoints")
    with pytest.raises(SchemaError, match=r"^gripper: 'half'"):
        render_plan(schema, dataclasses.replace(plan, gripper="half"))
    with pytest.raises(SchemaError, match=r"expected shape \(N, 3\)"):
        RobotActionPlan(subtask="", gripper="open", waypoints=[[0.0, 0.0]])
