"""What the planning nodes share (:class:`~blockpilot.ros_nodes.planner_node.PlannerNode` for driving,
:class:`~blockpilot.ros_nodes.arm_node.ArmNode` for an arm): the lifecycle, the parameters, the one-slot
mailbox and planning thread, the deadline and refusal rules, diagnostics and the ``main`` loop.

Lifecycle (as Nav2's planner server): *configure* validates the parameters, loads the planner
(:func:`~blockpilot.runtime.sources.open_planner` on the bundle or the checkpoint), runs one warm-up plan and creates
the publishers, subscriptions and the planning thread; *activate* / *deactivate* open and close the gate to
planning and to the lifecycle publishers; *cleanup* and *shutdown* stop the thread and free the planner.

Threading: the executor (single-threaded) runs only short callbacks. A camera callback puts the message in a
one-slot mailbox (:class:`~blockpilot.ros_nodes.diagnostics.FrameSlot`; a frame still waiting there is replaced and
counted as ``dropped_busy``: the planner always takes the newest frame); the other inputs' callbacks only store
them. One planning thread takes frames from the slot, plans and publishes, so a slow plan never delays the other
inputs or the lifecycle and parameter services, and the node holds at most two frames (one in flight, one waiting).

A frame that cannot give a valid plan (stale or missing inputs, a malformed image, an answer that does not parse, a
plan later than ``deadline_ms``, a planner error) publishes no plan, only a WARN or ERROR diagnostic, and the node
keeps running. Each node adds its inputs, its observation and its outputs (the hooks below).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.timer import Timer
from std_msgs.msg import Float64

from ..errors import BlockpilotError, require_extra
from ..runtime.backend import BackendError
from ..runtime.plan_types import Observation, ObservationError, Plan, RobotObservation
from ..runtime.planner import Planner
from . import conversions as conv
from .diagnostics import FrameSlot, PlannerDiagnostics
from .params import ModelParams, ParamsError, load_params_file
from .rclpy_compat import add_parameters_callbacks

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
LIVE_PARAMETERS: tuple[str, ...] = ("deadline_ms",)


@dataclass(frozen=True, slots=True)
class Frame:
    msg: Any
    topic: str
    compressed: bool
    received: float  # time.monotonic()


def qos(reliable: bool, depth: int) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


class PlanningNode(LifecycleNode):
    """A planner as a managed node; ``params`` are the declared parameters' defaults (ROS overrides, such as
    ``--ros-args -p``, still win). Subclasses set :attr:`params_class` and :attr:`live_parameters` and fill in
    the hooks :meth:`_warm_up`, :meth:`_create_entities`, :meth:`_reset_inputs` and :meth:`_plan`."""

    params_class = ModelParams  # each node its own
    live_parameters = LIVE_PARAMETERS  # read for every frame; the rest at configure

    def __init__(self, params: Any = None, *, node_name: str, **node_kwargs: Any) -> None:
        params = params or self.params_class()
        overrides = list(node_kwargs.pop("parameter_overrides", None) or [])
        if getattr(params, "use_sim_time", False):
            overrides.append(Parameter("use_sim_time", value=True))
        super().__init__(node_name, parameter_overrides=overrides, **node_kwargs)
        for name, value, description in params.ros_parameters():
            self.declare_parameter(name, value, ParameterDescriptor(description=description))
        self.params: Any = self._read_params()
        add_parameters_callbacks(self, self._check_parameters, self._apply_parameters)
        self.finalized = False
        self.planner: Planner | None = None
        self.diagnostics = PlannerDiagnostics(f"{self.get_name()}: planner", "none", {"state": "unconfigured"})
        self._slot: FrameSlot[Frame] = FrameSlot(self.diagnostics)
        self._worker: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        self._input_lock = threading.Lock()
        self._entities: list[Any] = []
        self._pubs: dict[str, Any] = {}
        self._diag_pub: Any = None
        self._reset_inputs(params)

    # ---- hooks -----------------------------------------------------------------------------------------

    def _check_planner(self, planner: Planner, params: Any) -> None:
        """Raise a :class:`~blockpilot.errors.BlockpilotError` if ``planner`` does not suit the node's parameters."""

    def _warm_up(self, planner: Planner) -> None:
        raise NotImplementedError

    def _details(self, params: Any) -> dict[str, str]:
        """Fixed key/values of the diagnostics beside state, backend, decoder, model and deadline."""
        return {}

    def _create_entities(self, params: Any) -> None:
        """Publishers (in ``self._pubs``, ``"time"`` among them) and subscriptions (in ``self._entities``)."""
        raise NotImplementedError

    def _reset_inputs(self, params: Any) -> None:
        """Forget every stored input (at construction and at configure)."""

    def _plan(self, frame: Frame) -> None:
        raise NotImplementedError

    # ---- parameters ------------------------------------------------------------------------------

    def _read_params(self) -> Any:
        names = [f.name for f in fields(self.params_class)]
        return self.params_class.from_mapping({n: self.get_parameter(n).value for n in names})

    def _check_parameters(self, parameters: list[Parameter[Any]]) -> SetParametersResult:
        try:
            self.params.with_ros_changes(parameters)
        except ParamsError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter[Any]]) -> None:
        self.params = self.params.with_ros_changes(parameters)  # not get_parameter: Humble stores them after
        later = sorted({p.name for p in parameters} - set(self.live_parameters))
        if later and self.planner is not None:
            self.get_logger().info(f"{', '.join(later)} take effect at the next configure")

    # ---- lifecycle -------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            params = self.params.require_model()
            self.planner = self._load_planner(params)
            self._check_planner(self.planner, params)
        except (BlockpilotError, OSError) as exc:  # a bad param, model, bundle or missing extra: the user's to fix
            self.get_logger().error(f"configure failed: {exc}")
            self.planner = None
            return FAILURE
        self._warm_up(self.planner)
        backend = params.resolved_backend + (f"/{params.device}" if params.resolved_backend == "torch" else "")
        self.diagnostics = PlannerDiagnostics(
            f"{self.get_name()}: planner", backend,
            {"state": "inactive", "backend": backend, "decoder": params.decoder, "model": params.model_path,
             "deadline_ms": f"{params.deadline_ms:g}", **self._details(params)})
        self._slot = FrameSlot(self.diagnostics)
        self._create_entities(params)
        self._pubs["time"] = self.create_lifecycle_publisher(Float64, params.processing_time_topic, qos(True, 10))
        self._diag_pub = self.create_publisher(DiagnosticArray, params.diagnostics_topic, qos(True, 10))
        self._entities.append(self.create_timer(params.diagnostics_period_s, self._publish_diagnostics))
        self._reset_inputs(params)
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

    def _load_planner(self, params: Any) -> Planner:
        from ..runtime.sources import open_planner

        if not params.bundle:
            require_extra("torch", "torch", f"the {self.get_name()} node on a checkpoint")
            import torch

            torch.set_num_threads(params.threads)
        return open_planner(params.model_path, **params.planner_options())

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
        self._slot.offer(Frame(msg, topic, compressed, time.monotonic()), conv.stamp_ns(msg.header.stamp))

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

    def _run_planner(self, observation: Observation | RobotObservation, topic: str, stamp: int) -> Plan | None:
        """The plan, or ``None`` with the refusal diagnosed (``topic``: the frame's, named in the message)."""
        assert self.planner is not None
        try:
            return self.planner.plan(observation)
        except ObservationError as exc:
            self.diagnostics.outcome("bad_observation", f"{topic}: observation refused: {exc}", stamp_ns=stamp)
        except BackendError as exc:
            self.diagnostics.outcome("planner_error", f"planner error: {exc}", stamp_ns=stamp)
        return None

    def _deliver(self, plan: Plan, frame: Frame, stamp: int, parsed: bool,
                 publish: Callable[[float], None]) -> None:
        """Publish ``plan`` (``publish(latency_ms)``) unless the node was deactivated meanwhile, the answer did not
        parse or the plan missed ``deadline_ms``; the processing time goes out in every case but the first."""
        latency = (time.monotonic() - frame.received) * 1e3
        deadline = self.params.deadline_ms

        def outcome(kind: str, message: str) -> None:
            self.diagnostics.outcome(kind, message, stamp_ns=stamp, stage_ms=plan.stats.stage_ms, latency_ms=latency)

        with self._publish_lock:
            if not self._slot.active:
                outcome("inactive", "deactivated while planning")
                return
            self._pubs["time"].publish(Float64(data=latency))
            if not parsed:
                outcome("parse_failure", f"the answer does not parse: {plan.error}")
                return
            if latency > deadline:
                outcome("deadline_miss", f"plan ready {latency:.1f} ms after its frame arrived "
                                         f"(deadline {deadline:g} ms)")
                return
            publish(latency)
            outcome("planned", f"planned in {latency:.1f} ms")


def run_node(node_class: type[PlanningNode], argv: list[str] | None, *, command: str, default_name: str) -> int:
    """A planning node's ``main``: run it until SIGINT, SIGTERM or a shutdown transition; returns the exit status.

    ``--params FILE`` is a ROS 2 params file (see :mod:`blockpilot.ros_nodes.params`); ``--autostart``
    (the default) configures and activates the node at once; ``--ros-args ...`` go to rclpy.
    """
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    prog = f"blockpilot ros {command}"
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=f"the blockpilot {command} node")
    parser.add_argument("--params", type=Path, help="ROS 2 params file with a section for the node")
    parser.add_argument("--node-name", default=default_name)
    parser.add_argument("--autostart", action=argparse.BooleanOptionalAction, default=True,
                        help="configure and activate at start (default on)")
    args = parser.parse_args(remove_ros_args([command, *args_in])[1:])
    try:
        params = load_params_file(args.params, args.node_name, node_class.params_class) if args.params else None
    except ParamsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    rclpy.init(args=[command, *args_in], signal_handler_options=SignalHandlerOptions.NO)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    node: PlanningNode | None = None
    executor = SingleThreadedExecutor()
    status = 0
    try:
        node = node_class(params, node_name=args.node_name)
        executor.add_node(node)
        if args.autostart and (node.trigger_configure() != SUCCESS or node.trigger_activate() != SUCCESS):
            node.get_logger().error("autostart failed: the node did not reach the active state")
            status = 1
        while status == 0 and not stop.is_set() and not node.finalized and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except ParamsError as exc:  # an invalid --ros-args -p override
        print(f"{prog}: {exc}", file=sys.stderr)
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
