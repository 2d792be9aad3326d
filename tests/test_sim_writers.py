"""Format writers: nuScenes tables (loaded by the real devkit in its own venv), WOD-E2E TFRecords
(framing read back by a reader written apart from the writer), rosbag2 MCAP (read by rosbags and mcap)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sim_writer_fixtures import (
    FRONT,
    WOD,
    crc32c_bitwise,
    file_tree,
    independent_records,
    make_scene,
    render,
    render_any,
)

from blockpilot.formats.tfrecord import crc32c, read_tfrecord, write_tfrecord
from blockpilot.geometry import to_ego_frame
from blockpilot.sim.types import Scene
from blockpilot.sim.writers import nuscenes as nus
from blockpilot.sim.writers.mcap_writer import write_rosbag2
from blockpilot.sim.writers.wod_e2e import write_wod_e2e

DEVKIT = "nuscenes-devkit==1.2.0"


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [make_scene(7, 0.0, "go straight"), make_scene(8, 0.08, "turn left")]


@pytest.fixture(scope="module")
def generated() -> list[Scene]:
    from blockpilot.sim.generator import generate_scene

    return [generate_scene(seed, duration_s=10.0) for seed in (1, 2)]


# ---- TFRecord / WOD-E2E ---------------------------------------------------------------------------

def test_crc32c_and_framing(tmp_path: Path) -> None:
    assert crc32c(b"123456789") == 0xE3069283 == crc32c_bitwise(b"123456789")
    assert crc32c(b"") == 0 and crc32c(bytes(32)) == 0x8A9136AA
    records = [b"", b"a", os.urandom(1000)]
    path = tmp_path / "x.tfrecord"
    assert write_tfrecord(path, records) == 3
    assert independent_records(path) == records == list(read_tfrecord(path))
    corrupt = bytearray(path.read_bytes())
    corrupt[-6] ^= 1
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="data CRC mismatch"):
        list(read_tfrecord(path))


def test_protos_keep_official_field_numbers() -> None:
    from blockpilot.formats.wod import dataset_pb2
    from blockpilot.formats.wod import end_to_end_driving_data_pb2 as e2e

    numbers = {
        e2e.E2EDFrame: {"frame": 1, "future_states": 5, "past_states": 6, "intent": 7, "preference_trajectories": 8},
        e2e.EgoTrajectoryStates: {"pos_x": 1, "pos_y": 2, "pos_z": 3, "vel_x": 4, "vel_y": 5, "accel_x": 6,
                                  "accel_y": 7, "preference_score": 8},
        dataset_pb2.Frame: {"context": 1, "timestamp_micros": 2, "images": 4},
        dataset_pb2.Context: {"name": 1, "camera_calibrations": 2, "stats": 4},
        dataset_pb2.CameraImage: {"name": 1, "image": 2},
        dataset_pb2.CameraCalibration: {"name": 1, "intrinsic": 2, "extrinsic": 3, "width": 4, "height": 5,
                                        "rolling_shutter_direction": 6},
    }
    for message, fields in numbers.items():
        assert {f.name: f.number for f in message.DESCRIPTOR.fields} == fields
    assert dict(e2e.EgoIntent.Intent.items()) == {"UNKNOWN": 0, "GO_STRAIGHT": 1, "GO_LEFT": 2, "GO_RIGHT": 3}
    assert dataset_pb2.CameraName.Name.Value("REAR_RIGHT") == 8


def test_committed_protos_match_sources(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from blockpilot.formats.wod import compile as proto_compile
    from blockpilot.formats.wod import dataset_pb2, end_to_end_driving_data_pb2

    out = tmp_path / "set.pb"
    assert protoc.main(proto_compile.protoc_args(f"--descriptor_set_out={out}")) == 0
    compiled = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}

    def drop_json_names(messages) -> None:  # protoc adds them to descriptor sets, gencode leaves them out
        for message in messages:
            for fld in message.field:
                fld.ClearField("json_name")
            drop_json_names(message.nested_type)

    for file in compiled.values():
        drop_json_names(file.message_type)
    for module in (dataset_pb2, end_to_end_driving_data_pb2):
        committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert committed == compiled[committed.name]


def test_wod_e2e_frames(tmp_path: Path, scenes: list[Scene]) -> None:
    from blockpilot.formats.wod import end_to_end_driving_data_pb2 as e2e

    path = write_wod_e2e(scenes, tmp_path, cameras=WOD, render=render, frame_rate_hz=1.0)
    frames = [e2e.E2EDFrame.FromString(r) for r in independent_records(path)]
    assert [f.frame.context.name for f in frames] == [
        "synthetic-unit-7-0038", "synthetic-unit-7-0048", "synthetic-unit-8-0038", "synthetic-unit-8-0048"]
    assert [f.intent for f in frames] == [e2e.EgoIntent.GO_STRAIGHT] * 2 + [e2e.EgoIntent.GO_LEFT] * 2
    for frame in frames:
        past, future = frame.past_states, frame.future_states
        assert len(past.pos_x) == len(past.vel_x) == len(past.accel_y) == 16 and len(future.pos_x) == 20
        assert (past.pos_x[-1], past.pos_y[-1]) == (0.0, 0.0) and past.vel_x[-1] == pytest.approx(10, abs=0.05)
        scene = scenes[0] if "unit-7" in frame.frame.context.name else scenes[1]
        step = int(frame.frame.context.name[-4:])
        ego = to_ego_frame(scene.ego.xy[[step - 20, step + 10, step + 50]], scene.ego.xy[step], scene.ego.yaw[step])
        np.testing.assert_allclose([[past.pos_x[7], past.pos_y[7]], [future.pos_x[3], future.pos_y[3]],
                                    [future.pos_x[19], future.pos_y[19]]], ego, atol=1e-4)
        rated = frame.preference_trajectories
        assert [t.preference_score for t in rated] == [10.0, 6.0, 3.0]
        assert list(rated[0].pos_x) == list(future.pos_x) and rated[1].pos_x[-1] < future.pos_x[-1] - 15
        assert [c.name for c in frame.frame.context.camera_calibrations] == [1, 2, 3] == [
            i.name for i in frame.frame.images]
        calib = frame.frame.context.camera_calibrations[1]
        assert list(calib.intrinsic[:4]) == [40.0, 40.0, 32.0, 24.0] and len(calib.extrinsic.transform) == 16
        assert Image.open(io.BytesIO(frame.frame.images[0].image)).size == (64, 48)
    left = frames[3].future_states
    assert left.pos_y[-1] > 8  # turning left at 0.08 rad/s for 5 s bends the path ~10 m left
    assert frames[1].frame.timestamp_micros - frames[0].frame.timestamp_micros == 1_000_000


def test_wod_e2e_generated_scene_all_cameras(tmp_path: Path, generated: list[Scene]) -> None:
    from blockpilot.formats.wod import end_to_end_driving_data_pb2 as e2e
    from blockpilot.sim.cameras import WOD_CAMERAS

    frames = [e2e.E2EDFrame.FromString(r) for r in read_tfrecord(write_wod_e2e(generated[:1], tmp_path))]
    assert len(frames) == 2 and frames[0].frame.context.name == f"{generated[0].name}-0038"
    for frame in frames:
        assert [i.name for i in frame.frame.images] == list(range(1, 9)) == [
            c.name for c in frame.frame.context.camera_calibrations]
        for image, camera in zip(frame.frame.images, WOD_CAMERAS, strict=True):
            assert Image.open(io.BytesIO(image.image)).size == (camera.width, camera.height)
        assert frame.intent == {"go straight": 1, "turn left": 2, "turn right": 3}[generated[0].route_command]


# ---- rosbag2 MCAP --------------------------------------------------------------------------------

def test_rosbag2_read_by_rosbags_and_mcap(tmp_path: Path, scenes: list[Scene]) -> None:
    from mcap.reader import make_reader
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    scene = scenes[1]
    bag = write_rosbag2(scene, tmp_path / "bag", camera=FRONT, render=render, camera_rate_hz=5.0)
    counts: dict[str, int] = {}
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        for conn, stamp, raw in reader.messages(connections=reader.connections):
            msg = reader.deserialize(raw, conn.msgtype)
            counts[conn.topic] = counts.get(conn.topic, 0) + 1
            if hasattr(msg, "header"):
                assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == stamp
            if conn.topic == "/odom" and counts["/odom"] == 51:
                assert (msg.pose.pose.position.x, msg.pose.pose.position.y) == pytest.approx(tuple(scene.ego.xy[50]))
                assert msg.twist.twist.linear.x == pytest.approx(10, abs=0.05)
                assert msg.twist.twist.angular.z == pytest.approx(0.08, abs=1e-3)
            if conn.topic == "/route_command":
                assert msg.data == "turn left"
            if conn.topic.endswith("/compressed"):
                assert msg.format == "jpeg" and Image.open(io.BytesIO(msg.data.tobytes())).size == (64, 48)
            if conn.topic.endswith("/camera_info"):
                assert list(msg.k) == [40.0, 0.0, 32.0, 0.0, 40.0, 24.0, 0.0, 0.0, 1.0]
    assert counts == {"/camera/front/image_raw/compressed": 51, "/camera/front/camera_info": 51, "/odom": 101,
                      "/imu/data": 101, "/route_command": 11}
    mcap_files = list(bag.glob("*.mcap"))
    assert len(mcap_files) == 1 and "blockpilot.synthetic: 'true'" in (bag / "metadata.yaml").read_text()
    with mcap_files[0].open("rb") as f:
        summary = make_reader(f).get_summary()
    assert summary is not None and summary.statistics is not None
    assert summary.statistics.message_count == 315
    assert {c.message_encoding for c in summary.channels.values()} == {"cdr"}
    assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}


# ---- nuScenes ------------------------------------------------------------------------------------

def _load_tables(root: Path) -> dict[str, list[dict]]:
    return {t: json.loads((root / nus.VERSION / f"{t}.json").read_text()) for t in nus.TABLES}


def _annotations_expected(scene: Scene) -> int:
    steps = range(0, scene.num_steps, 5)
    return sum(int(np.hypot(*(a.track.xy[i] - scene.ego.xy[i])) <= nus.ANNOTATION_RANGE_M)
               for a in scene.agents for i in steps)


def test_nuscenes_tokens_and_links(tmp_path: Path, scenes: list[Scene]) -> None:
    root = nus.write_nuscenes(scenes, tmp_path / "ns", camera=FRONT, render=render)
    tables = _load_tables(root)
    index = {t: {r["token"]: r for r in rows} for t, rows in tables.items()}
    assert all(len(index[t]) == len(rows) for t, rows in tables.items())
    refs = {"log_token": "log", "scene_token": "scene", "sample_token": "sample", "instance_token": "instance",
            "category_token": "category", "visibility_token": "visibility", "sensor_token": "sensor",
            "ego_pose_token": "ego_pose", "calibrated_sensor_token": "calibrated_sensor",
            "first_sample_token": "sample", "last_sample_token": "sample",
            "first_annotation_token": "sample_annotation", "last_annotation_token": "sample_annotation"}
    for table, rows in tables.items():
        for row in rows:
            for key, target in refs.items():
                if key in row:
                    assert row[key] in index[target], (table, key)
            for tok in row.get("attribute_tokens", []):
                assert tok in index["attribute"]
            for key in ("prev", "next"):
                if row.get(key):
                    linked = index[table][row[key]]
                    assert linked["prev" if key == "next" else "next"] == row["token"]
            if "filename" in row:
                assert (root / row["filename"]).is_file()
    for scene in tables["scene"]:
        chain, tok = [], scene["first_sample_token"]
        while tok:
            chain.append(index["sample"][tok])
            tok = chain[-1]["next"]
        assert len(chain) == scene["nbr_samples"] == 21 and chain[-1]["token"] == scene["last_sample_token"]
        assert {s["timestamp"] - chain[0]["timestamp"] for s in chain} == {i * 500_000 for i in range(21)}
        assert "SYNTHETIC" in scene["description"]
    for inst in tables["instance"]:
        n, tok = 0, inst["first_annotation_token"]
        while tok:
            assert index["sample_annotation"][tok]["instance_token"] == inst["token"]
            n, last, tok = n + 1, tok, index["sample_annotation"][tok]["next"]
        assert n == inst["nbr_annotations"] and last == inst["last_annotation_token"]
    # agent 4 is 220 m away: out of range, so it has no instance
    assert len(tables["instance"]) == 6
    assert len(tables["sample_annotation"]) == sum(_annotations_expected(s) for s in scenes)
    assert all(log["vehicle"] == "blockpilot-synthetic" for log in tables["log"])
    assert len(tables["sample_data"]) == 2 * 42 and all(sd["is_key_frame"] for sd in tables["sample_data"])
    numbers = nus.scene_numbers(200)  # the CAN-bus API refuses scenes 161-168, 170-176, 309-314
    assert len(set(numbers)) == 200 and numbers[159:162] == [160, 169, 177]


def test_writers_are_deterministic(tmp_path: Path, generated: list[Scene]) -> None:
    for run in ("a", "b"):
        nus.write_nuscenes(generated, tmp_path / run / "ns")
        write_wod_e2e(generated, tmp_path / run / "wod")
        write_rosbag2(generated[0], tmp_path / run / "bag", camera_rate_hz=2.0)
    a, b = file_tree(tmp_path / "a"), file_tree(tmp_path / "b")
    assert a == b and len(a) > 100 and any(k.endswith("metadata.yaml") for k in a)


DEVKIT_SCRIPT = Path(__file__).with_name("nuscenes_devkit_check.py")


def _devkit_python() -> Path:
    """The devkit's own venv (it pins numpy<2), made on first use under the user's cache."""
    venv = Path(os.environ.get("BLOCKPILOT_DEVKIT_VENV", Path.home() / ".cache/blockpilot/nuscenes-devkit-venv"))
    python = venv / "bin" / "python"
    stamp = venv / f".installed-{DEVKIT}"
    if not (stamp.exists() and python.exists()):
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", DEVKIT],
                       check=True)
        stamp.write_text(f"installed in {time.monotonic() - start:.0f} s\n")
    return python


def test_nuscenes_loads_in_devkit(tmp_path: Path, scenes: list[Scene], generated: list[Scene]) -> None:
    scenes = scenes + generated
    root = nus.write_nuscenes(scenes, tmp_path / "ns", render=render_any)
    run = subprocess.run([str(_devkit_python()), str(DEVKIT_SCRIPT), nus.VERSION, str(root)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in result] == ["scene-0001", "scene-0002", "scene-0003", "scene-0004"]
    for rec, scene in zip(result, scenes, strict=True):
        assert rec["samples"] == 21 and rec["boxes"] == _annotations_expected(scene) and rec["on_map"]
        assert rec["can_pose"] == rec["imu"] == 101 and rec["route"] == len(scene.road.centerline)
        assert rec["points"] >= 21 * 32
        assert rec["can_keys"] == ["accel", "orientation", "pos", "rotation_rate", "utime", "vel"]
    assert result[0]["in_image"] > 0
    # boxes at the first keyframe in the devkit's flat ego frame match the scene's own ego-frame positions
    scene = scenes[0]
    expected = sorted([name, *to_ego_frame(a.track.xy[:1], scene.ego.xy[0], 0.0)[0].tolist(), a.size[2] / 2]
                      for name, a in zip(("vehicle.car", "human.pedestrian.adult", "vehicle.bicycle"),
                                         scene.agents, strict=False))
    assert [b[0] for b in result[0]["first"]] == [e[0] for e in expected]
    np.testing.assert_allclose([b[1:] for b in result[0]["first"]], [e[1:] for e in expected], atol=2e-3)
    # ... and the devkit's camera calibration puts the car ahead where our own projection does
    from blockpilot.sim.cameras import FRONT_CAMERA
    from blockpilot.sim.writers._common import project_to_image

    pixels = {name: uv for name, *uv in result[0]["first_pixels"]}
    ours, _ = project_to_image(FRONT_CAMERA, np.array([next(e[1:] for e in expected if e[0] == "vehicle.car")]))
    np.testing.assert_allclose(pixels["vehicle.car"], ours[0], atol=0.02)
