"""``PlannerNode``: a ROS 2 lifecycle node around :class:`~blockpilot.runtime.planner.Planner`.

The lifecycle, the mailbox and planning thread, and the deadline and refusal rules are those of every planning
node (:mod:`blockpilot.ros_nodes.node_base`).

Inputs: the front camera as ``sensor_msgs/Image`` and/or ``CompressedImage`` (best effort, keep
last ``camera_queue_depth``, 5 as in rclpy's sensor-data profile: the callback only moves a frame
into the slot below, so a deeper queue adds no latency, while a frame the middleware overwrites
before the executor takes it is one the node never sees and cannot count), ``nav_msgs/Odometry``
(best effort, depth 50) and the route command as ``std_msgs/String`` (reliable).

Outputs: for a valid plan only, ``nav_msgs/Path`` and/or ``geometry_msgs/PoseArray`` in
``output_frame`` stamped with the camera stamp, and the plan as JSON (``std_msgs/String``); for
every plan the planner ran, the processing time as ``std_msgs/Float64`` in milliseconds (frame
received -> plan ready, the figure ``deadline_ms`` bounds; a float is what plots and monitors take
without conversion); ``diagnostic_msgs/DiagnosticArray`` after every frame handled and every
``diagnostics_period_s``, also while inactive (an ordinary publisher).

Threading: the executor (single-threaded) runs only short callbacks. A camera callback puts the
message in a one-slot mailbox (:class:`~blockpilot.ros_nodes.diagnostics.FrameSlot`; a frame still
waiting there is replaced and counted as ``dropped_busy``: the planner always takes the newest
frame); odometry and route callbacks update the ego history. One planning thread takes frames from
the slot, decodes, plans and publishes. So a slow plan never delays odometry intake or the
lifecycle and parameter services, and the node holds at most two frames (one in flight, one waiting).

Any frame that cannot give a valid plan (stale, missing or non-finite odometry, a malformed
image, an answer that does not parse, a plan later than the deadline, a planner error) publishes
no path, only a WARN or ERROR diagnostic, and the node keeps running.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from geometry_msgs.msg import PoseArray
from nav_msgs.msg import Odometry
from nav_msgs.msg import Path as PathMsg
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ..runtime.backend import BackendError
from ..runtime.plan_types import Observation
from ..runtime.planner import Planner
from ..vla.prompt import ROUTE_COMMANDS, EgoState
from . import conversions as conv
from .node_base import FAILURE, SUCCESS, Frame, PlanningNode, qos, run_node
from .params import DEFAULT_NODE_NAME, PlannerParams

__all__ = ["FAILURE", "LIVE_PARAMETERS", "SUCCESS", "PlannerNode", "main"]
# Read for every frame; every other parameter is read at configure.
LIVE_PARAMETERS = ("deadline_ms", "max_odom_age_ms", "output_frame")


class PlannerNode(PlanningNode):
    """The driving planner as a managed node; ``params`` are the declared parameters' defaults (ROS overrides,
    such as ``--ros-args -p``, still win)."""

    params_class = PlannerParams
    live_parameters = LIVE_PARAMETERS

    def __init__(self, params: PlannerParams | None = None, *, node_name: str = DEFAULT_NODE_NAME,
                 **node_kwargs: Any) -> None:
        super().__init__(params, node_name=node_name, **node_kwargs)

    def _details(self, params: PlannerParams) -> dict[str, str]:
        return {"max_odom_age_ms": f"{params.max_odom_age_ms:g}"}

    def _reset_inputs(self, params: PlannerParams) -> None:
        with self._input_lock:
            self._odom = conv.OdomHistory()
        self._route = params.default_route_command

    def _warm_up(self, planner: Planner) -> None:
        """One plan on a grey frame, so that the first camera frame does not pay for lazy initialisation."""
        vision = planner.config.vision
        side = vision.window_size if vision is not None else 0
        images = [np.full((side, side, 3), 127, np.uint8)] if vision is not None else []
        ego = EgoState(past_waypoints=np.zeros((4, 2)), speed_mps=0.0, accel_mps2=0.0)
        try:
            planner.plan(Observation(images=images, ego=ego, route_command=ROUTE_COMMANDS[1]))
        except BackendError as exc:
            self.get_logger().warning(f"warm-up plan failed (the first frame pays for it): {exc}")

    def _create_entities(self, p: PlannerParams) -> None:
        out = qos(True, 10)
        kinds = {"path": ("path",), "pose_array": ("pose_array",), "both": ("path", "pose_array")}[p.output_kind]
        if "path" in kinds:
            self._pubs["path"] = self.create_lifecycle_publisher(PathMsg, p.path_topic, out)
        if "pose_array" in kinds:
            self._pubs["pose_array"] = self.create_lifecycle_publisher(PoseArray, p.pose_array_topic, out)
        self._pubs["json"] = self.create_lifecycle_publisher(String, p.plan_json_topic, out)
        camera = qos(False, p.camera_queue_depth)
        if p.image_topic:
            self._entities.append(self.create_subscription(
                Image, p.image_topic, lambda m: self._on_frame(m, p.image_topic, False), camera))
        if p.compressed_image_topic:
            self._entities.append(self.create_subscription(
                CompressedImage, p.compressed_image_topic,
                lambda m: self._on_frame(m, p.compressed_image_topic, True), camera))
        self._entities.append(self.create_subscription(Odometry, p.odometry_topic, self._on_odometry, qos(False, 50)))
        self._entities.append(self.create_subscription(String, p.route_topic, self._on_route, qos(True, 10)))

    # ---- executor callbacks (short) ----------------------------------------------------------------

    def _on_odometry(self, msg: Odometry) -> None:
        try:
            sample = conv.odom_sample(msg)
        except conv.OdometryError as exc:
            with self._input_lock:
                self._odom.refuse(exc)
            self.diagnostics.odometry(False)
            self.get_logger().warning(f"{self.params.odometry_topic}: {exc}", throttle_duration_sec=1.0)
            return
        with self._input_lock:
            self._odom.add(sample)
        self.diagnostics.odometry(True)

    def _on_route(self, msg: String) -> None:
        command = str(msg.data).strip().lower()
        if command in ROUTE_COMMANDS:
            self._route = command
            self.diagnostics.route(True)
        else:
            self.diagnostics.route(False, f"{self.params.route_topic}: route command {msg.data!r} refused (expected "
                                          f"one of {', '.join(ROUTE_COMMANDS)}); keeping {self._route!r}")

    # ---- planning thread -----------------------------------------------------------------------------

    def _plan(self, frame: Frame) -> None:
        d, p = self.diagnostics, self.params
        stamp = conv.stamp_ns(frame.msg.header.stamp)
        try:
            image = conv.image_from_compressed(frame.msg) if frame.compressed else conv.image_from_raw(frame.msg)
            with self._input_lock:
                ego = self._odom.ego_state(stamp, round(p.max_odom_age_ms * 1e6))
        except conv.ConversionError as exc:
            source = frame.topic if exc.kind == "malformed_image" else p.odometry_topic
            d.outcome(exc.kind, f"{source}: {exc}", stamp_ns=stamp)
            return
        route = self._route
        plan = self._run_planner(Observation(images=[image], ego=ego, route_command=route), frame.topic, stamp)
        if plan is None:
            return
        waypoints = plan.waypoints

        def publish(latency: float) -> None:
            assert waypoints is not None
            if "path" in self._pubs:
                self._pubs["path"].publish(conv.path_msg(waypoints, stamp, p.output_frame))
            if "pose_array" in self._pubs:
                self._pubs["pose_array"].publish(conv.pose_array_msg(waypoints, stamp, p.output_frame))
            self._pubs["json"].publish(String(data=conv.plan_json(plan, stamp=stamp, frame_id=p.output_frame,
                                                             latency_ms=latency, route_command=route)))

        self._deliver(plan, frame, stamp, waypoints is not None, publish)


def main(argv: list[str] | None = None) -> int:
    """Run the planner node until SIGINT, SIGTERM or a shutdown transition; returns the exit status.

    ``--params FILE`` is a ROS 2 params file (see :mod:`blockpilot.ros_nodes.params`); ``--autostart``
    (the default) configures and activates the node at once; ``--ros-args ...`` go to rclpy.
    """
    return run_node(PlannerNode, argv, command="planner", default_name=DEFAULT_NODE_NAME)


if __name__ == "__main__":
    raise SystemExit(main())
