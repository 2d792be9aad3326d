"""A synthetic scene as a rosbag2 recording (``metadata.yaml`` + one MCAP file, ROS 2 CDR messages).

Topics (ROS 2 Humble message definitions):

- ``/camera/front/image_raw/compressed`` sensor_msgs/msg/CompressedImage (JPEG) and
  ``/camera/front/camera_info`` sensor_msgs/msg/CameraInfo, at ``camera_rate_hz``;
- ``/odom`` nav_msgs/msg/Odometry (``odom`` -> ``base_link``; twist in ``base_link``) and
  ``/imu/data`` sensor_msgs/msg/Imu (gravity-free body acceleration), every scene step;
- ``/route_command`` std_msgs/msg/String (``turn left`` | ``go straight`` | ``turn right``) at 1 Hz.

The bag's ``custom_data`` says it is synthetic and names the scene and its seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from blockpilot.sim.types import Scene
from blockpilot.sim.writers._common import (
    CameraLike,
    RenderFn,
    default_render,
    render_jpeg,
    scene_start_us,
    step_time_us,
    steps_at_rate,
    synthetic_name,
    yaw_rate,
)

IMAGE_TOPIC = "/camera/front/image_raw/compressed"
CAMERA_INFO_TOPIC = "/camera/front/camera_info"
ODOM_TOPIC = "/odom"
IMU_TOPIC = "/imu/data"
ROUTE_TOPIC = "/route_command"
CAMERA_FRAME = "camera_front_optical_frame"
ROUTE_RATE_HZ = 1.0
BAG_VERSION: Final = 8  # rosbag2 metadata version 8 (Iron and later read it; rosbags reads 1..9)


class _Msgs:
    """Message constructors from a rosbags typestore, so call sites stay short."""

    def __init__(self) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.store = get_typestore(Stores.ROS2_HUMBLE)
        self.t = self.store.types

    def header(self, stamp_ns: int, frame_id: str) -> Any:
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        return self.t["std_msgs/msg/Header"](stamp=self.t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                             frame_id=frame_id)

    def vec3(self, x: float, y: float, z: float) -> Any:
        return self.t["geometry_msgs/msg/Vector3"](x=x, y=y, z=z)

    def quat_yaw(self, yaw: float) -> Any:
        return self.t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=float(np.sin(yaw / 2)),
                                                      w=float(np.cos(yaw / 2)))

    def serialize(self, msg: Any) -> bytes:
        return bytes(self.store.serialize_cdr(msg, msg.__msgtype__))


def _camera_info(m: _Msgs, stamp_ns: int, camera: CameraLike) -> Any:
    k = np.array([camera.fx, 0.0, camera.cx, 0.0, camera.fy, camera.cy, 0.0, 0.0, 1.0])
    p = np.array([camera.fx, 0.0, camera.cx, 0.0, 0.0, camera.fy, camera.cy, 0.0, 0.0, 0.0, 1.0, 0.0])
    roi = m.t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return m.t["sensor_msgs/msg/CameraInfo"](
        header=m.header(stamp_ns, CAMERA_FRAME), height=camera.height, width=camera.width,
        distortion_model="plumb_bob", d=np.zeros(5), k=k, r=np.eye(3).ravel(), p=p, binning_x=0, binning_y=0,
        roi=roi)


def _odometry(m: _Msgs, stamp_ns: int, scene: Scene, step: int, omega: float) -> Any:
    x, y, yaw, speed, _ = (float(v) for v in scene.ego.states[step])
    pose = m.t["geometry_msgs/msg/Pose"](position=m.t["geometry_msgs/msg/Point"](x=x, y=y, z=0.0),
                                         orientation=m.quat_yaw(yaw))
    twist = m.t["geometry_msgs/msg/Twist"](linear=m.vec3(speed, 0.0, 0.0), angular=m.vec3(0.0, 0.0, omega))
    return m.t["nav_msgs/msg/Odometry"](
        header=m.header(stamp_ns, "odom"), child_frame_id="base_link",
        pose=m.t["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=m.t["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)))


def _imu(m: _Msgs, stamp_ns: int, scene: Scene, step: int, omega: float) -> Any:
    speed, accel = float(scene.ego.speed[step]), float(scene.ego.accel[step])
    return m.t["sensor_msgs/msg/Imu"](
        header=m.header(stamp_ns, "base_link"), orientation=m.quat_yaw(float(scene.ego.yaw[step])),
        orientation_covariance=np.zeros(9), angular_velocity=m.vec3(0.0, 0.0, omega),
        angular_velocity_covariance=np.zeros(9), linear_acceleration=m.vec3(accel, speed * omega, 0.0),
        linear_acceleration_covariance=np.zeros(9))


def write_rosbag2(scene: Scene, bag_dir: str | Path, *, camera: CameraLike | None = None,
                  render: RenderFn | None = None, camera_rate_hz: float = 10.0, ordinal: int = 0) -> Path:
    """Write ``scene`` as a rosbag2 directory ``bag_dir`` (which must not exist); returns its path.

    ``camera`` defaults to :data:`blockpilot.sim.cameras.FRONT_CAMERA`; ``ordinal`` offsets the
    clock by one hour per scene, as the other writers do, so bags of different scenes never overlap.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    if camera is None:
        from blockpilot.sim.cameras import FRONT_CAMERA

        camera = FRONT_CAMERA
    render_fn = render or default_render()
    m = _Msgs()
    start_ns = scene_start_us(ordinal) * 1000
    omega = yaw_rate(scene.ego, scene.dt)
    events: list[tuple[int, int, str, Any]] = []  # (stamp, topic order, topic, message)
    for step in steps_at_rate(scene, camera_rate_hz):
        stamp = start_ns + step_time_us(scene, step) * 1000
        image = m.t["sensor_msgs/msg/CompressedImage"](
            header=m.header(stamp, CAMERA_FRAME), format="jpeg",
            data=np.frombuffer(render_jpeg(render_fn, scene, step, camera), dtype=np.uint8))
        events += [(stamp, 0, IMAGE_TOPIC, image), (stamp, 1, CAMERA_INFO_TOPIC, _camera_info(m, stamp, camera))]
    for step in range(scene.num_steps):
        stamp = start_ns + step_time_us(scene, step) * 1000
        events += [(stamp, 2, ODOM_TOPIC, _odometry(m, stamp, scene, step, float(omega[step]))),
                   (stamp, 3, IMU_TOPIC, _imu(m, stamp, scene, step, float(omega[step])))]
    for step in steps_at_rate(scene, ROUTE_RATE_HZ):
        stamp = start_ns + step_time_us(scene, step) * 1000
        events.append((stamp, 4, ROUTE_TOPIC, m.t["std_msgs/msg/String"](data=scene.route_command)))
    events.sort(key=lambda e: (e[0], e[1]))

    path = Path(bag_dir)
    with Writer(path, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP) as writer:
        for key, value in (("synthetic", "true"), ("generator", "blockpilot.sim"), ("scene", synthetic_name(scene)),
                           ("seed", str(scene.seed)), ("route_command", scene.route_command)):
            writer.set_custom_data(f"blockpilot.{key}", value)
        connections = {}
        for _, _, topic, msg in events:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msg.__msgtype__, typestore=m.store)
        for stamp, _, topic, msg in events:
            writer.write(connections[topic], stamp, m.serialize(msg))
    return path
