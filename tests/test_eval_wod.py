"""WOD-E2E replay source on TFRecords written by the synthetic writer from hand-built scenes, and the
checked TFRecord scan it reads them with."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from sim_writer_fixtures import WOD, make_scene, render

from blockpilot.eval.types import DatasetError, EvalSample, SampleError, SampleFailure
from blockpilot.eval.wod import WodE2ESource
from blockpilot.formats.tfrecord import (
    TFRecordError,
    count_tfrecords,
    crc32c,
    crc32c_python,
    read_tfrecord,
    scan_tfrecord,
    write_tfrecord,
)
from blockpilot.formats.wod import end_to_end_driving_data_pb2 as e2e
from blockpilot.sim.writers.wod_e2e import write_wod_e2e

R = 10 / 0.08  # radius of the turning scene: 10 m/s at 0.08 rad/s


@pytest.fixture(scope="module")
def wod_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenes = [make_scene(7, 0.0, "go straight"), make_scene(8, 0.08, "turn left")]
    return write_wod_e2e(scenes, tmp_path_factory.mktemp("wod"), cameras=WOD, render=render, frame_rate_hz=1.0)


@pytest.fixture(scope="module")
def records(wod_file: Path) -> list[bytes]:
    return list(read_tfrecord(wod_file))


def _offsets(path: Path) -> list[tuple[int, int]]:
    """(data start, length) of every record, from the framing."""
    raw, out, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<Q", raw, pos)
        out.append((pos + 12, length))
        pos += 16 + length
    return out


def _samples(items: list[EvalSample | SampleFailure]) -> list[EvalSample]:
    assert all(isinstance(i, EvalSample) for i in items), [i for i in items if isinstance(i, SampleFailure)]
    return [i for i in items if isinstance(i, EvalSample)]


# ---- TFRecord scan ---------------------------------------------------------------------------------

def test_scan_goes_on_after_a_data_crc_error(tmp_path: Path) -> None:
    assert crc32c(b"123456789") == crc32c_python(b"123456789") == 0xE3069283
    data = [b"first", os.urandom(300), b"third"]
    path = tmp_path / "x.tfrecord"
    write_tfrecord(path, data)
    start, length = _offsets(path)[1]
    raw = bytearray(path.read_bytes())
    raw[start + length // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    items = list(scan_tfrecord(path))
    assert [i for i, _ in items] == [0, 1, 2] and items[0][1] == b"first" and items[2][1] == b"third"
    error = items[1][1]
    assert isinstance(error, TFRecordError) and error.index == 1 and error.path == path
    assert str(error) == f"{path}: record 1 data CRC mismatch"
    assert count_tfrecords(path) == 3
    with pytest.raises(ValueError, match="record 1 data CRC mismatch"):
        list(read_tfrecord(path))


@pytest.mark.parametrize("damage", ["length", "cut_header", "cut_data"])
def test_scan_stops_at_broken_framing(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.tfrecord"
    write_tfrecord(path, [b"a" * 10, b"b" * 20, b"c" * 30])
    start, length = _offsets(path)[1]
    raw = bytearray(path.read_bytes())
    if damage == "length":
        raw[start - 12] ^= 0x01  # the length itself: its CRC no longer matches
    cut = {"length": len(raw), "cut_header": start - 5, "cut_data": start + length - 3}[damage]
    path.write_bytes(bytes(raw[:cut]))
    items = list(scan_tfrecord(path))
    assert len(items) == 2 == count_tfrecords(path) and items[0] == (0, b"a" * 10)
    error = items[1][1]
    assert isinstance(error, TFRecordError) and error.index == 1
    assert error.problem == {"length": "length CRC mismatch", "cut_header": "header cut short",
                             "cut_data": "cut short"}[damage]


# ---- WOD-E2E source --------------------------------------------------------------------------------

def test_values_from_hand_built_scenes(wod_file: Path) -> None:
    source = WodE2ESource(wod_file)
    samples = _samples(list(source))
    assert len(source) == len(samples) == 4 and source.name == "wod"
    assert source.describe() == {"source": "wod", "path": str(wod_file), "files": [str(wod_file)],
                                 "cameras": ["FRONT"], "records": 4, "frame": "ego"}
    straight, turn = samples[0], samples[3]
    assert [s.scene for s in samples] == ["synthetic-unit-7-0038", "synthetic-unit-7-0048",
                                          "synthetic-unit-8-0038", "synthetic-unit-8-0048"]
    assert straight.sample_id == f"wod/synthetic-unit-7-0038/{straight.timestamp_us}"
    assert samples[1].timestamp_us - straight.timestamp_us == 1_000_000
    assert straight.source == "wod" and straight.frame == "ego" and straight.agents is None
    np.testing.assert_allclose(straight.ego.past_waypoints, [[-20, 0], [-15, 0], [-10, 0], [-5, 0]], atol=1e-5)
    assert straight.ego.speed_mps == pytest.approx(10, abs=1e-3) and straight.ego.accel_mps2 == pytest.approx(0)
    assert straight.route_command == "go straight" and straight.extra["intent"] == "GO_STRAIGHT"
    assert straight.extra["speed_from"] == "velocity" and straight.extra["accel_from"] == "accel_x"
    assert straight.future is not None and straight.future.valid.all()
    np.testing.assert_allclose(straight.future.times_s, np.arange(1, 21) * 0.25)
    np.testing.assert_allclose(straight.future.xy, np.column_stack([10 * straight.future.times_s, 0 * np.ones(20)]),
                               atol=1e-4)
    for sample in samples:
        assert [r.score for r in sample.raters] == [10.0, 6.0, 3.0]
        assert sample.future is not None
        np.testing.assert_array_equal(sample.raters[0].xy, sample.future.xy)
        assert sample.raters[1].xy[-1, 0] < sample.future.xy[-1, 0] - 15  # the slower rater
    # the turn: a circle of radius R, so in the ego frame a point phi = 0.08 * dt along it is at R (sin, 1 - cos)
    assert turn.route_command == "turn left" and turn.extra["intent"] == "GO_LEFT"
    phi = 0.08 * np.array([-2.0, -1.5, -1.0, -0.5])
    np.testing.assert_allclose(turn.ego.past_waypoints, np.column_stack([R * np.sin(phi), R * (1 - np.cos(phi))]),
                               atol=1e-3)
    assert turn.future is not None
    phi = 0.08 * turn.future.times_s[3::4]  # 1, 2, ..., 5 s fall on scene steps
    np.testing.assert_allclose(turn.future.xy[3::4], np.column_stack([R * np.sin(phi), R * (1 - np.cos(phi))]),
                               atol=1e-3)
    assert turn.ego.speed_mps == pytest.approx(10, abs=1e-3)
    images = straight.load_images()
    assert straight.image_names == ("FRONT",) and len(images) == 1
    assert images[0].shape == (48, 64, 3) and images[0].dtype == np.uint8


def test_several_cameras_and_a_missing_one(wod_file: Path) -> None:
    three = _samples(list(WodE2ESource(wod_file, cameras=("FRONT_RIGHT", "FRONT"))))
    assert three[0].image_names == ("FRONT_RIGHT", "FRONT")
    assert [i.shape for i in three[0].load_images()] == [(48, 64, 3)] * 2
    items = list(WodE2ESource(wod_file, cameras=("FRONT", "REAR")))
    assert len(items) == 4 and all(isinstance(i, SampleFailure) and i.kind == "error" for i in items)
    assert isinstance(items[0], SampleFailure) and "no image from camera REAR" in items[0].reason
    assert items[0].sample_id.startswith("wod/synthetic-unit-7-0038/")
    with pytest.raises(ValueError, match="WOD camera names"):
        WodE2ESource(wod_file, cameras=("CAM_FRONT",))


def test_directory_and_missing_paths(tmp_path: Path, records: list[bytes]) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        WodE2ESource(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not a record")
    with pytest.raises(DatasetError, match="holds no file"):
        WodE2ESource(tmp_path)
    write_tfrecord(tmp_path / "b.tfrecord-00001-of-00002", records[:2])
    write_tfrecord(tmp_path / "a.tfrecord-00000-of-00002", records[2:])
    source = WodE2ESource(tmp_path)
    assert [f.name for f in source.files] == ["a.tfrecord-00000-of-00002", "b.tfrecord-00001-of-00002"]
    assert [s.scene[-6:] for s in _samples(list(source))] == ["8-0038", "8-0048", "7-0038", "7-0048"]
    assert len(source) == 4


def test_flipped_byte_fails_only_that_record(tmp_path: Path, wod_file: Path) -> None:
    path = tmp_path / "one.tfrecord"
    raw = bytearray(wod_file.read_bytes())
    start, length = _offsets(wod_file)[1]
    raw[start + length // 3] ^= 0x04
    path.write_bytes(bytes(raw))
    source = WodE2ESource(path)
    items = list(source)
    assert len(items) == len(source) == 4
    assert [isinstance(i, EvalSample) for i in items] == [True, False, True, True]
    failure = items[1]
    assert isinstance(failure, SampleFailure) and failure.kind == "error"
    assert failure.sample_id == "wod/one.tfrecord/record-1" and f"{path}: record 1 data CRC" in failure.reason


def test_truncated_file(tmp_path: Path, wod_file: Path) -> None:
    path = tmp_path / "cut.tfrecord"
    start, length = _offsets(wod_file)[2]
    path.write_bytes(wod_file.read_bytes()[: start + length // 2])
    source = WodE2ESource(path)
    items = list(source)
    assert len(items) == len(source) == 3 and [isinstance(i, EvalSample) for i in items] == [True, True, False]
    assert isinstance(items[2], SampleFailure) and "record 2 cut short" in items[2].reason


def _variant(record: bytes, edit: str) -> bytes:
    frame = e2e.E2EDFrame.FromString(record)
    if edit == "test_split":
        frame.intent = e2e.EgoIntent.UNKNOWN
        frame.ClearField("future_states")
        for name in ("vel_x", "vel_y", "accel_x", "accel_y"):
            frame.past_states.ClearField(name)
        frame.preference_trajectories[1].preference_score = -1.0
        frame.preference_trajectories[2].ClearField("preference_score")
    elif edit == "short_past":
        for name in ("pos_x", "pos_y"):
            del getattr(frame.past_states, name)[:8]
    elif edit == "bad_jpeg":
        frame.frame.images[0].image = frame.frame.images[0].image[:200]
    return frame.SerializeToString()


def test_broken_and_unusual_records(tmp_path: Path, records: list[bytes]) -> None:
    path = tmp_path / "mixed.tfrecord"
    write_tfrecord(path, [records[0], b"\x0a\x05ab", _variant(records[1], "test_split"),
                          _variant(records[2], "short_past"), _variant(records[3], "bad_jpeg"), b""])
    items = list(WodE2ESource(path))
    assert len(items) == 6
    ok, garbage, test_split, short, bad_jpeg, empty = items
    assert isinstance(ok, EvalSample)
    assert isinstance(garbage, SampleFailure) and garbage.kind == "error"
    assert "record 1 is not an E2EDFrame" in garbage.reason and garbage.sample_id == "wod/mixed.tfrecord/record-1"
    assert isinstance(test_split, EvalSample) and test_split.future is None
    assert test_split.route_command == "go straight" and test_split.extra["intent"] == "UNKNOWN"
    assert test_split.extra["speed_from"] == "positions" and test_split.ego.speed_mps == pytest.approx(10, abs=1e-3)
    assert test_split.extra["accel_from"].startswith("absent") and test_split.ego.accel_mps2 == 0.0
    assert [r.score for r in test_split.raters] == [10.0]
    assert isinstance(short, SampleFailure) and short.kind == "skipped" and "8 past states" in short.reason
    assert isinstance(bad_jpeg, EvalSample)
    with pytest.raises(SampleError, match=f"{bad_jpeg.sample_id}: camera FRONT: corrupt image"):
        bad_jpeg.load_images()
    assert isinstance(empty, SampleFailure) and "no frame.context.name" in empty.reason
