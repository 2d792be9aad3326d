"""The planner node's parameters: one frozen, validated dataclass and its ROS 2 params-file loader.

Every field is a ROS parameter of the same name. A params file in the ROS 2 layout, for example::

    blockpilot_planner:
      ros__parameters:
        checkpoint: models/reference      # or bundle: path/to/bundle (exactly one of the two)
        trusted_keys: ""                  # bundle only: public key files, comma-separated (or a YAML list)
        backend: auto                     # auto | torch | onnxruntime | tensorrt
        dtype: auto                       # checkpoint only: auto (its stored dtype) | float32 | bfloat16 | float16
        threads: 1
        decoder: scaffold                 # ar | ar_free | block | scaffold | rollouts
        rollouts: 4                       # used by the rollouts decoder only
        deadline_ms: 500.0                # frame received -> plan ready; a later plan is not published
        max_odom_age_ms: 250.0            # camera stamp minus newest odometry stamp
        default_route_command: go straight
        output_frame: base_link
        output_kind: path                 # path | pose_array | both
        image_topic: /camera/front/image_raw                        # "" turns the raw subscription off
        compressed_image_topic: /camera/front/image_raw/compressed  # "" turns it off
        odometry_topic: /odom
        route_topic: /route_command
        path_topic: /blockpilot/plan/path
        pose_array_topic: /blockpilot/plan/poses
        plan_json_topic: /blockpilot/plan/json
        diagnostics_topic: /diagnostics
        processing_time_topic: /blockpilot/plan/processing_time_ms
        camera_queue_depth: 5             # best effort, as rclpy's sensor-data profile
        diagnostics_period_s: 1.0
        use_sim_time: false               # declared by rclpy itself; passed on to the node

Paths are used as written (relative ones from the working directory, as ROS does). A section named
``/**`` applies to every node and is read first. Integers are accepted for float fields; anything
else of the wrong type, an unknown key or an invalid value raises :class:`ParamsError` naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Self, TypeVar

from ..errors import BlockpilotError
from ..runtime import backend as runtime_backends
from ..runtime.plan_types import DECODERS, DecoderSettings, PlannerSetupError
from ..vla.dtypes import DTYPE_CHOICES
from ..vla.prompt import ROUTE_COMMANDS

# The runtime's backend names, each with "auto" (torch for a checkpoint, onnxruntime for a bundle).
BACKENDS = ("auto", *runtime_backends.BACKENDS)
CHECKPOINT_BACKENDS = ("auto", *runtime_backends.CHECKPOINT_BACKENDS)
BUNDLE_BACKENDS = ("auto", *runtime_backends.BUNDLE_BACKENDS)
OUTPUT_KINDS = ("path", "pose_array", "both")
DEFAULT_NODE_NAME = "blockpilot_planner"
# Declared by every rclpy node itself; the planner node passes it on as an override.
ROS_NODE_PARAMETERS = ("use_sim_time",)
# One line per parameter, for the ROS parameter descriptors.
PARAM_DESCRIPTIONS = {
    "checkpoint": f"local checkpoint directory ({', '.join(CHECKPOINT_BACKENDS[1:])}); exactly one of checkpoint and "
                  "bundle",
    "bundle": f"bundle directory ({', '.join(BUNDLE_BACKENDS[1:])}); exactly one of checkpoint and bundle",
    "trusted_keys": "public key files (PEM), comma-separated: run the bundle only if signed by one of them; empty: "
                    "signatures are not checked",
    "backend": f"{' | '.join(BACKENDS)} (auto: torch for a checkpoint, onnxruntime for a bundle)",
    "device": "torch device of a checkpoint planner (cpu, cuda:0)",
    "dtype": "dtype a checkpoint is loaded and planned in: auto (the dtype its weights are stored in) | float32 | "
             "bfloat16 | float16; a bundle runs in the dtype it was exported in",
    "threads": "CPU threads of the backend",
    "decoder": "ar | ar_free | block | scaffold | rollouts",
    "rollouts": "rollouts of the rollouts decoder",
    "deadline_ms": "frame received -> plan ready; a later plan is diagnosed, not published",
    "max_odom_age_ms": "largest camera stamp minus newest odometry stamp that still plans",
    "default_route_command": "route command until one arrives: turn left | go straight | turn right",
    "output_frame": "frame id of the published path and poses (the ego frame)",
    "output_kind": "path (nav_msgs/Path) | pose_array (geometry_msgs/PoseArray) | both",
    "camera_queue_depth": "subscription depth of the camera topics (best effort); frames the middleware "
                          "overwrites before the node takes them are never seen, so they cannot be counted",
    "diagnostics_period_s": "period of the diagnostics published between frames",
}
_NAME_TOKEN = r"[A-Za-z_][A-Za-z0-9_]*"
_TOPIC = re.compile(rf"^(~/|/)?{_NAME_TOKEN}(/{_NAME_TOKEN})*$")
_FRAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
P = TypeVar("P", bound="ModelParams")


class ParamsError(BlockpilotError, ValueError):
    """A parameter value, a params file or a set of parameters is unusable; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str, source: str | None = None) -> None:
        self.field, self.reason, self.source = field, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {reason}")


def need(cond: bool, name: str, reason: str) -> None:
    """Raise :class:`ParamsError` on ``name`` unless ``cond``."""
    if not cond:
        raise ParamsError(name, reason)


def check_topics(params: Any, names: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Every topic parameter in ``names`` is a valid ROS topic name (those in ``optional`` may be empty)."""
    optional = set(optional)
    for name in names:
        topic = getattr(params, name)
        if topic == "" and name in optional:
            continue
        need(bool(_TOPIC.match(topic)), name, f"{topic!r} is not a valid ROS topic name")


def check_frame(params: Any, name: str) -> None:
    value = getattr(params, name)
    need(bool(_FRAME.match(value)), name, f"must be a frame id without a leading slash or spaces, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelParams:
    """What every planning node reads to open its planner (checkpoint or bundle, backend, decoder) and its
    deadline; each node's parameters extend it. Validated as :class:`PlannerParams` describes."""

    checkpoint: str = ""
    bundle: str = ""
    trusted_keys: str = ""  # a ROS string, comma-separated (an empty string array would be declared as bytes)
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 1
    decoder: str = "scaffold"
    rollouts: int = 4
    deadline_ms: float = 500.0

    def __post_init__(self) -> None:
        self._check_types()
        if self.checkpoint and self.bundle:
            raise ParamsError("checkpoint", f"give a checkpoint or a bundle, not both (bundle is {self.bundle!r})")
        need(not (self.trusted_keys and self.checkpoint), "trusted_keys", "checks a signed bundle; a checkpoint "
                                                                          "carries no signature")
        need(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        if self.checkpoint:
            need(self.backend in CHECKPOINT_BACKENDS, "backend",
                 f"a checkpoint runs on {' or '.join(CHECKPOINT_BACKENDS[1:])}; {self.backend!r} needs a bundle "
                 "(export one first)")
        if self.bundle:
            need(self.backend in BUNDLE_BACKENDS, "backend",
                 f"a bundle runs on {' or '.join(BUNDLE_BACKENDS[1:])}, not {self.backend!r}")
        need(bool(self.device.strip()), "device", "must not be empty (cpu, cuda, cuda:0)")
        need(self.dtype in DTYPE_CHOICES, "dtype", f"must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.bundle:
            need(self.dtype == "auto", "dtype", f"{self.dtype!r} applies to a checkpoint; a bundle runs in the dtype "
                                                "it was exported in (leave dtype auto)")
        need(self.threads >= 1, "threads", f"must be at least 1, got {self.threads}")
        need(self.decoder in DECODERS, "decoder", f"must be one of {DECODERS}, got {self.decoder!r}")
        need(self.rollouts >= 1, "rollouts", f"must be at least 1, got {self.rollouts}")
        self._check_positive("deadline_ms")
        try:
            self.decoder_settings()
        except PlannerSetupError as exc:
            raise ParamsError("decoder", str(exc)) from None

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, name, f"must be a positive finite number, got {value}")

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                continue
            expected = {"str": str, "int": int, "float": float, "bool": bool}[kind]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ParamsError(f.name, f"expected {kind}, got {type(value).__name__} {value!r}")

    @property
    def model_path(self) -> str:
        return self.checkpoint or self.bundle

    @property
    def resolved_backend(self) -> str:
        """The backend the node loads: ``auto`` is torch for a checkpoint, onnxruntime for a bundle."""
        if self.backend != "auto":
            return self.backend
        return "onnxruntime" if self.bundle else "torch"

    def require_model(self) -> Self:
        """``self`` if exactly one of checkpoint and bundle is set, else :class:`ParamsError`."""
        if not self.model_path:
            raise ParamsError("checkpoint", "set checkpoint (a local checkpoint directory) or bundle (a bundle "
                                            "directory); neither is set")
        return self

    def decoder_settings(self) -> DecoderSettings:
        return DecoderSettings(name=self.decoder, rollouts=self.rollouts)

    def planner_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~blockpilot.runtime.sources.open_planner` for :attr:`model_path`."""
        if self.bundle:
            return {"backend": self.resolved_backend, "decoder": self.decoder_settings(), "threads": self.threads,
                    "kinds": ("bundle",), "flag": "bundle",
                    "trusted_keys": [k.strip() for k in self.trusted_keys.split(",") if k.strip()]}
        return {"backend": self.resolved_backend, "decoder": self.decoder_settings(), "device": self.device,
                "dtype": self.dtype, "kinds": ("checkpoint",), "flag": "checkpoint"}

    def descriptions(self) -> Mapping[str, str]:
        """One line per parameter, for the ROS parameter descriptors."""
        return PARAM_DESCRIPTIONS

    def ros_parameters(self) -> list[tuple[str, Any, str]]:
        """``(name, value, description)`` of every parameter the node declares (not those rclpy declares)."""
        described = self.descriptions()
        return [(f.name, getattr(self, f.name), described.get(f.name, f.name.replace("_", " ")))
                for f in fields(self) if f.name not in ROS_NODE_PARAMETERS]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_changes(self, changes: Mapping[str, Any]) -> Self:
        """A validated copy with ``changes`` applied; unknown names raise :class:`ParamsError`."""
        known = {f.name for f in fields(self)}
        for name in changes:
            if name not in known:
                raise ParamsError(str(name), f"unknown parameter; known: {', '.join(sorted(known))}")
        keys = changes.get("trusted_keys")  # a YAML list of key files is accepted too
        listed = {"trusted_keys": ",".join(map(str, keys))} if isinstance(keys, (list, tuple)) else {}
        return replace(self, **{**dict(changes), **listed})

    def with_ros_changes(self, parameters: Iterable[Any]) -> Self:
        """:meth:`with_changes` from rclpy ``Parameter`` objects; names that are not the node's parameters are
        ignored."""
        known = {f.name for f in fields(self)}
        return self.with_changes({p.name: p.value for p in parameters if p.name in known})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        return cls().with_changes(values)


@dataclass(frozen=True, slots=True)
class PlannerParams(ModelParams):
    """Everything the planner node reads. A value that is valid on its own but not with the others
    (a checkpoint on onnxruntime, both a checkpoint and a bundle) is refused here; having neither a
    checkpoint nor a bundle is allowed until configure (see :meth:`require_model`)."""

    max_odom_age_ms: float = 250.0
    default_route_command: str = "go straight"
    output_frame: str = "base_link"
    output_kind: str = "path"
    image_topic: str = "/camera/front/image_raw"
    compressed_image_topic: str = "/camera/front/image_raw/compressed"
    odometry_topic: str = "/odom"
    route_topic: str = "/route_command"
    path_topic: str = "/blockpilot/plan/path"
    pose_array_topic: str = "/blockpilot/plan/poses"
    plan_json_topic: str = "/blockpilot/plan/json"
    diagnostics_topic: str = "/diagnostics"
    processing_time_topic: str = "/blockpilot/plan/processing_time_ms"
    camera_queue_depth: int = 5
    diagnostics_period_s: float = 1.0
    use_sim_time: bool = False

    def __post_init__(self) -> None:
        ModelParams.__post_init__(self)  # not super(): a slots dataclass is a new class object
        self._check_positive("max_odom_age_ms", "diagnostics_period_s")
        need(self.default_route_command in ROUTE_COMMANDS, "default_route_command",
             f"must be one of {ROUTE_COMMANDS}, got {self.default_route_command!r}")
        check_frame(self, "output_frame")
        need(self.output_kind in OUTPUT_KINDS, "output_kind",
             f"must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        need(self.camera_queue_depth >= 1, "camera_queue_depth", f"must be at least 1, got {self.camera_queue_depth}")
        optional = ("image_topic", "compressed_image_topic")
        check_topics(self, (*optional, "odometry_topic", "route_topic", "plan_json_topic", "diagnostics_topic",
                            "processing_time_topic", "path_topic", "pose_array_topic"), optional)
        need(bool(self.image_topic or self.compressed_image_topic), "image_topic",
             "image_topic and compressed_image_topic are both empty; the node needs a camera")


def _section(data: Any, node_name: str, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ParamsError("<file>", f"expected a mapping of node names, got {type(data).__name__}", source)
    merged: dict[str, Any] = {}
    found = False
    for key in ("/**", node_name, f"/{node_name}"):
        if key not in data:
            continue
        found = True
        section = data[key]
        params = section.get("ros__parameters") if isinstance(section, dict) else None
        if not isinstance(params, dict):
            raise ParamsError(key, "expected a mapping with a 'ros__parameters' mapping inside", source)
        merged.update(params)
    if not found:
        raise ParamsError("<file>", f"no section for node {node_name!r} (nor '/**'); sections: "
                                    f"{', '.join(map(str, data)) or 'none'}", source)
    return merged


def load_params_file(path: str | Path, node_name: str = DEFAULT_NODE_NAME,
                     params_class: type[P] = PlannerParams) -> P:  # type: ignore[assignment]
    """The validated parameters (a ``params_class``) of ``node_name`` in the ROS 2 params file ``path``; the file
    must name exactly one of checkpoint and bundle. Raises :class:`ParamsError` (a ValueError) naming the field."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError("<file>", f"cannot read: {exc.strerror or exc}", source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError("<file>", f"not valid YAML: {exc}", source) from None
    values = _section(data, node_name, source)
    try:
        return params_class.from_mapping(values).require_model()
    except ParamsError as exc:
        raise ParamsError(exc.field, exc.reason, source) from None
