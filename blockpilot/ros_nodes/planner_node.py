"""``PlannerNode``: a ROS 2 lifecycle node around :class:`~blockpilot.runtime.planner.Planner`.

Lifecycle (as Nav2's planner server): *configure* validates the parameters, loads the planner
(:func:`~blockpilot.runtime.sources.open_planner` on the bundle or the checkpoint), runs one warm-up plan and creates
the publishers, subscriptions and the planning thread; *activate* / *deactivate* open and close the gate to
planning and to the lifecycle publishers; *cleanup* and *shutdown* stop the thread and free the planner.

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

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray
from nav_msgs.msg import Odometry
from nav_msgs.msg import Path as PathMsg
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.timer import Timer
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64, String

from ..errors import BlockpilotError, require_extra
from ..runtime.backend import BackendError
from ..runtime.plan_types import Observation, ObservationError
from ..runtime.planner import Planner
from ..vla.prompt import ROUTE_COMMANDS, EgoState
from . import conversions as conv
from .diagnostics import FrameSlot, PlannerDiagnostics
from .params import DEFAULT_NODE_NAME, ParamsError, PlannerParams, load_params_file
from .rclpy_compat import add_parameters_callbacks

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
# Read for every frame; every other parameter is read at configure.
LIVE_PARAMETERS = ("deadline_ms", "max_odom_age_ms", "output_frame")


@dataclass(frozen=True, slots=True)
class _Frame:
    msg: Any
    topic: str
    compressed: bool
    received: float  # time.monotonic()


def _qos(reliable: bool, depth: int) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


class PlannerNode(LifecycleNode):
    """The planner as a managed node; ``params`` are the declared parameters' defaults (ROS overrides,
    such as ``--ros-args -p``, still win)."""

    def __init__(self, params: PlannerParams | None = None, *, node_name: str = DEFAULT_NODE_NAME,
                 **node_kwargs: Any) -> None:
        params = params or PlannerParams()
        overrides = list(node_kwargs.pop("parameter_overrides", None) or [])
        if params.use_sim_time:
            overrides.append(Parameter("use_sim_time", value=True))
        super().__init__(node_name, parameter_overrides=overrides, **node_kwargs)
        for name, value, description in params.ros_parameters():
            self.declare_parameter(name, value, ParameterDescriptor(description=description))
        self.params = self._read_params()
        add_parameters_callbacks(self, self._check_parameters, self._apply_parameters)
        self.finalized = False
        self.planner: Planner | None = None
        self.diagnostics = PlannerDiagnostics(f"{self.get_name()}: planner", "none", {"state": "unconfigured"})
        self._slot: FrameSlot[_Frame] = FrameSlot(self.diagnostics)
        self._worker: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self._odom_lock = threading.Lock()
        self._odom = conv.OdomHistory()
        self._route = params.default_route_command
        self._entities: list[Any] = []
        self._pubs: dict[str, Any] = {}
        self._diag_pub: Any = None

    # ---- parameters ------------------------------------------------------------------------------

    def _read_params(self) -> PlannerParams:
        names = [f.name for f in fields(PlannerParams)]
        return PlannerParams.from_mapping({n: self.get_parameter(n).value for n in names})

    def _check_parameters(self, parameters: list[Parameter[Any]]) -> SetParametersResult:
        try:
            self.params.with_ros_changes(parameters)
        except ParamsError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter[Any]]) -> None:
        self.params = self.params.with_ros_changes(parameters)  # not get_parameter: Humble stores them after
        later = sorted({p.name for p in parameters} - set(LIVE_PARAMETERS))
        if later and self.planner is not None:
            self.get_logger().info(f"{', '.join(later)} take effect at the next configure")

    # ---- lifecycle -------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            params = self.params.require_model()
            self.planner = self._load_planner(params)
        except (BlockpilotError, OSError) as exc:  # a bad param, model, bundle or missing extra: the user's to fix
            self.get_logger().error(f"configure failed: {exc}")
            return FAILURE
        self._warm_up(self.planner)
        backend = params.resolved_backend + (f"/{params.device}" if params.resolved_backend == "torch" else "")
        self.diagnostics = PlannerDiagnostics(
            f"{self.get_name()}: planner", backend,
            {"state": "inactive", "backend": backend, "decoder": params.decoder, "model": params.model_path,
             "deadline_ms": f"{params.deadline_ms:g}", "max_odom_age_ms": f"{params.max_odom_age_ms:g}"})
        self._slot = FrameSlot(self.diagnostics)
        self._create_entities(params)
        with self._odom_lock:
            self._odom = conv.OdomHistory()
        self._route = params.default_route_command
        self._worker = threading.Thread(target=self._work, name="blockpilot-planner", daemon=True)
        self._worker.start()
        self.get_logger().info(f"configured: {params.model_path} on {backend}, {params.decoder} decoder")
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        self._slot.set_active(True)
        self.diagnostics.set_detail("state", "active")
        self._publish_diagnostics()
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._publish_lock:  # after this no plan goes out: the worker publishes under the lock
            self._slot.set_active(False)
        self.diagnostics.set_detail("state", "inactive")
        self._publish_diagnostics()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.diagnostics.set_detail("state", "unconfigured")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.finalized = True
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}; releasing the planner")
        self._teardown()
        return SUCCESS

    def _load_planner(self, params: PlannerParams) -> Planner:
        from ..runtime.sources import open_planner

        if not params.bundle:
            require_extra("torch", "torch", "the planner node on a checkpoint")
            import torch

            torch.set_num_threads(params.threads)
        return open_planner(params.model_path, **params.planner_options())

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
        out = _qos(True, 10)
        kinds = {"path": ("path",), "pose_array": ("pose_array",), "both": ("path", "pose_array")}[p.output_kind]
        if "path" in kinds:
            self._pubs["path"] = self.create_lifecycle_publisher(PathMsg, p.path_topic, out)
        if "pose_array" in kinds:
            self._pubs["pose_array"] = self.create_lifecycle_publisher(PoseArray, p.pose_array_topic, out)
        self._pubs["json"] = self.create_lifecycle_publisher(String, p.plan_json_topic, out)
        self._pubs["time"] = self.create_lifecycle_publisher(Float64, p.processing_time_topic, out)
        self._diag_pub = self.create_publisher(DiagnosticArray, p.diagnostics_topic, out)
        camera = _qos(False, p.camera_queue_depth)
        if p.image_topic:
            self._entities.append(self.create_subscription(
                Image, p.image_topic, lambda m: self._on_frame(m, p.image_topic, False), camera))
        if p.compressed_image_topic:
            self._entities.append(self.create_subscription(
                CompressedImage, p.compressed_image_topic,
                lambda m: self._on_frame(m, p.compressed_image_topic, True), camera))
        self._entities.append(self.create_subscription(Odometry, p.odometry_topic, self._on_odometry, _qos(False, 50)))
        self._entities.append(self.create_subscription(String, p.route_topic, self._on_route, _qos(True, 10)))
        self._entities.append(self.create_timer(p.diagnostics_period_s, self._publish_diagnostics))

    def _teardown(self) -> None:
        with self._publish_lock:
            self._slot.close()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        for entity in self._entities:
            if isinstance(entity, Timer):
                self.destroy_timer(entity)
            else:
                self.destroy_subscription(entity)
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        if self._diag_pub is not None:
            self.destroy_publisher(self._diag_pub)
        self._entities, self._pubs, self._diag_pub = [], {}, None
        self.planner = None

    # ---- executor callbacks (short) ----------------------------------------------------------------

    def _on_frame(self, msg: Any, topic: str, compressed: bool) -> None:
        self._slot.offer(_Frame(msg, topic, compressed, time.monotonic()), conv.stamp_ns(msg.header.stamp))

    def _on_odometry(self, msg: Odometry) -> None:
        try:
            sample = conv.odom_sample(msg)
        except conv.OdometryError as exc:
            with self._odom_lock:
                self._odom.refuse(exc)
            self.diagnostics.odometry(False)
            self.get_logger().warning(f"{self.params.odometry_topic}: {exc}", throttle_duration_sec=1.0)
            return
        with self._odom_lock:
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

    def _publish_diagnostics(self) -> None:
        with self._publish_lock:
            if self._diag_pub is not None:
                self._diag_pub.publish(self.diagnostics.array(self.get_clock().now().to_msg()))

    # ---- planning thread -----------------------------------------------------------------------------

    def _work(self) -> None:
        slot = self._slot
        while (frame := slot.take()) is not None:
            try:
                self._plan(frame)
            except Exception as exc:  # a bug must not stop the node: diagnose it and go on
                self.get_logger().error(f"planning failed unexpectedly: {type(exc).__name__}: {exc}")
                slot.diagnostics.outcome("internal_error", f"internal error: {type(exc).__name__}: {exc}")
            finally:
                slot.done()
            self._publish_diagnostics()

    def _plan(self, frame: _Frame) -> None:
        d, p, planner = self.diagnostics, self.params, self.planner
        assert planner is not None
        stamp = conv.stamp_ns(frame.msg.header.stamp)
        try:
            image = conv.image_from_compressed(frame.msg) if frame.compressed else conv.image_from_raw(frame.msg)
            with self._odom_lock:
                ego = self._odom.ego_state(stamp, round(p.max_odom_age_ms * 1e6))
        except conv.ConversionError as exc:
            source = frame.topic if exc.kind == "malformed_image" else p.odometry_topic
            d.outcome(exc.kind, f"{source}: {exc}", stamp_ns=stamp)
            return
        route = self._route
        try:
            plan = planner.plan(Observation(images=[image], ego=ego, route_command=route))
        except ObservationError as exc:
            d.outcome("bad_observation", f"{frame.topic}: observation refused: {exc}", stamp_ns=stamp)
            return
        except BackendError as exc:
            d.outcome("planner_error", f"planner error: {exc}", stamp_ns=stamp)
            return
        latency = (time.monotonic() - frame.received) * 1e3

        def outcome(kind: str, message: str) -> None:
            d.outcome(kind, message, stamp_ns=stamp, stage_ms=plan.stats.stage_ms, latency_ms=latency)

        with self._publish_lock:
            if not self._slot.active:
                outcome("inactive", "deactivated while planning")
                return
            self._pubs["time"].publish(Float64(data=latency))
            if plan.waypoints is None:
                outcome("parse_failure", f"the answer does not parse: {plan.error}")
                return
            if latency > p.deadline_ms:
                outcome("deadline_miss", f"plan ready {latency:.1f} ms after its frame arrived "
                                         f"(deadline {p.deadline_ms:g} ms)")
                return
            if "path" in self._pubs:
                self._pubs["path"].publish(conv.path_msg(plan.waypoints, stamp, p.output_frame))
            if "pose_array" in self._pubs:
                self._pubs["pose_array"].publish(conv.pose_array_msg(plan.waypoints, stamp, p.output_frame))
            self._pubs["json"].publish(String(data=conv.plan_json(plan, stamp=stamp, frame_id=p.output_frame,
                                                             latency_ms=latency, route_command=route)))
            outcome("planned", f"planned in {latency:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    """Run the planner node until SIGINT, SIGTERM or a shutdown transition; returns the exit status.

    ``--params FILE`` is a ROS 2 params file (see :mod:`blockpilot.ros_nodes.params`); ``--autostart``
    (the default) configures and activates the node at once; ``--ros-args ...`` go to rclpy.
    """
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="blockpilot ros planner", description="the blockpilot planner node")
    parser.add_argument("--params", type=Path, help="ROS 2 params file with a section for the node")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=True,
                        help="configure and activate at start (default on)")
    args = parser.parse_args(remove_ros_args(["planner", *args_in])[1:])
    try:
        params = load_params_file(args.params, args.node_name) if args.params else None
    except ParamsError as exc:
        print(f"blockpilot ros planner: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    rclpy.init(args=["planner", *args_in], signal_handler_options=SignalHandlerOptions.NO)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    node: PlannerNode | None = None
    executor = SingleThreadedExecutor()
    status = 0
    try:
        node = PlannerNode(params, node_name=args.node_name)
        executor.add_node(node)
        if args.autostart and (node.trigger_configure() != SUCCESS or node.trigger_activate() != SUCCESS):
            node.get_logger().error("autostart failed: the node did not reach the active state")
            status = 1
        while status == 0 and not stop.is_set() and not node.finalized and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except ParamsError as exc:  # an invalid --ros-args -p override
        print(f"blockpilot ros planner: {exc}", file=sys.stderr)
        status = 2
    finally:
        if node is not None:
            if not node.finalized:
                node.trigger_shutdown()
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
