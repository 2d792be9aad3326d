"""The TensorRT plugin behind ``blockpilot::BlockDiffusionAttention`` nodes, written in Python (IPluginV3).

TensorRT's ONNX parser maps a node to a plugin by its op type (the plugin name) and its ``plugin_namespace`` and
``plugin_version`` attributes; the other attributes reach :meth:`create_plugin` as fields converted to the types
the creator declares (:data:`FIELD_TYPES`). Call :func:`register_plugin` before parsing a plugin graph (the
build, :func:`blockpilot.export.trt_plugin.build_plugin_engine`) AND before deserializing an engine built from one
(the runtime, :class:`blockpilot.runtime.trt_engine.TrtEngine`): the engine stores the fields, not the code.

At run time :meth:`enqueue` wraps TensorRT's device pointers as torch tensors (``__cuda_array_interface__``, no
copy), writes the window's K/V into the present caches and runs the Triton kernel of
:mod:`blockpilot.kernels.block_attention` on TensorRT's stream. ``start`` / ``key_end`` / ``mode`` stay on the
device: the kernels read them there, so a step never syncs with the host. Where the bindings have
``IPluginV3OneBuildV2``, ``present_k`` / ``present_v`` are declared aliases of ``past_k`` / ``past_v`` and the
cache is updated in place; otherwise the plugin copies the past into the present first. The aliased tensors are
each layer's slices inside the network (``Gather`` of the graph's ``past_k`` in, ``Concat`` into its
``present_k`` out), never the network's own I/O.

The rules TensorRT asks about (fields, shapes, types, formats) are plain functions over names and ints here so
they are tested without a GPU; the classes only translate TensorRT's objects. TensorRT-RTX has these classes (so
registration works there) but builds no plugin layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import BlockpilotError
from ..formats.onnx_spec import PLUGIN_INPUTS, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_OUTPUTS, PLUGIN_VERSION
from .compat import TensorRT, trt_module

__all__ = ["ALIASES", "FIELD_TYPES", "FLOAT_TYPES", "OUTPUT_SHAPE_FROM", "PARSER_FIELDS", "SCALAR_POSITIONS",
           "SCALAR_TYPE", "AttentionAttrs", "PluginFieldError", "PluginShapeError", "attrs_from_fields",
           "attrs_to_fields", "check_input_shapes", "check_run_requirements", "device_tensor", "output_shapes",
           "output_types", "plugin_classes", "preview_features", "register_plugin", "run_plugin",
           "supports_combination"]
FIELD_TYPES = {"num_heads": "INT32", "num_kv_heads": "INT32", "head_dim": "INT32", "block_size": "INT32",
               "scale": "FLOAT32"}
PARSER_FIELDS = frozenset({"plugin_namespace", "plugin_version"})  # the parser's own, tolerated if passed on
FLOAT_TYPES = ("FLOAT", "HALF", "BF16")
SCALAR_TYPE = "INT32"
SCALAR_POSITIONS = (5, 6, 7)  # start, key_end, mode
OUTPUT_SHAPE_FROM = (0, 3, 4)  # attn like q, present_k like past_k, present_v like past_v
ALIASES = {1: 3, 2: 4}  # output -> input it may alias (the in-place cache write)


class PluginFieldError(BlockpilotError, ValueError):
    """A plugin field is missing, unknown or has a bad value; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{PLUGIN_NAME} field {field!r}: {message}")
        self.field = field


class PluginShapeError(BlockpilotError, ValueError):
    """The plugin's input shapes do not agree with each other or with its fields."""


@dataclass(frozen=True)
class AttentionAttrs:
    """The plugin's fields: the node's attributes minus the two the parser consumes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    scale: float

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise PluginFieldError(name, f"must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise PluginFieldError("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise PluginFieldError("scale", f"must be a positive finite float, got {self.scale}")


def attrs_from_fields(fields: Mapping[str, Any]) -> AttentionAttrs:
    """:class:`AttentionAttrs` from ``{name: data}`` (numpy arrays as TensorRT hands them, or plain numbers)."""
    unknown = sorted(set(fields) - set(FIELD_TYPES) - PARSER_FIELDS)
    if unknown:
        raise PluginFieldError(unknown[0], f"unknown field (known: {sorted(FIELD_TYPES)})")
    values: dict[str, Any] = {}
    for name, kind in FIELD_TYPES.items():
        if name not in fields:
            raise PluginFieldError(name, "missing")
        data = np.asarray(fields[name]).reshape(-1)
        if data.size != 1:
            raise PluginFieldError(name, f"expected one value, got {data.size}")
        value = data[0]
        if kind == "INT32":
            if not np.issubdtype(data.dtype, np.integer) and not float(value).is_integer():
                raise PluginFieldError(name, f"expected an integer, got {value!r}")
            values[name] = int(value)
        else:
            values[name] = float(value)
    return AttentionAttrs(**values)


def attrs_to_fields(attrs: AttentionAttrs) -> dict[str, np.ndarray]:
    """The fields as one-element numpy arrays of the declared types (what is serialized into the engine)."""
    dtypes = {"INT32": np.int32, "FLOAT32": np.float32}
    return {name: np.array([value], dtype=dtypes[FIELD_TYPES[name]]) for name, value in asdict(attrs).items()}


def check_input_shapes(shapes: Sequence[Sequence[int]], attrs: AttentionAttrs) -> None:
    """Raise :class:`PluginShapeError` unless the 8 input shapes fit the contract (``-1`` = not known yet)."""
    if len(shapes) != len(PLUGIN_INPUTS):
        raise PluginShapeError(f"expected {len(PLUGIN_INPUTS)} inputs {PLUGIN_INPUTS}, got {len(shapes)}")
    dims = dict(zip(PLUGIN_INPUTS, (tuple(int(d) for d in s) for s in shapes), strict=True))

    def agree(a: int, b: int) -> bool:
        return a < 0 or b < 0 or a == b

    expected: dict[str, tuple[int, ...]] = {"q": (1, attrs.num_heads, -1, attrs.head_dim)}
    for name in ("k_new", "v_new", "past_k", "past_v"):
        expected[name] = (1, attrs.num_kv_heads, -1, attrs.head_dim)
    for name in ("start", "key_end", "mode"):
        expected[name] = (1,)
    for name, want in expected.items():
        got = dims[name]
        if len(got) != len(want) or not all(agree(g, w) for g, w in zip(got, want, strict=True)):
            raise PluginShapeError(f"{name}: expected {want} (-1 = any), got {got}")
    window = [dims[n][2] for n in ("q", "k_new", "v_new")]
    if not all(agree(window[0], w) for w in window):
        raise PluginShapeError(f"q, k_new, v_new disagree on the window length T: {window}")
    if not agree(dims["past_k"][2], dims["past_v"][2]):
        raise PluginShapeError(f"past_k and past_v capacities differ: {dims['past_k']} vs {dims['past_v']}")


def output_shapes(shapes: Sequence[Sequence[int]], attrs: AttentionAttrs) -> list[tuple[int, ...]]:
    """Output shapes from input shapes: ``attn`` = ``q``, ``present_k`` = ``past_k``, ``present_v`` = ``past_v``."""
    check_input_shapes(shapes, attrs)
    return [tuple(int(d) for d in shapes[i]) for i in OUTPUT_SHAPE_FROM]


def output_types(input_types: Sequence[str]) -> list[str]:
    """Output data type names (``"FLOAT"``, ``"HALF"``, ``"BF16"``) from the inputs': all follow ``q``."""
    if input_types[0] not in FLOAT_TYPES:
        raise TypeError(f"q must be one of {FLOAT_TYPES}, got {input_types[0]}")
    return [input_types[0]] * len(PLUGIN_OUTPUTS)


def supports_combination(pos: int, types: Sequence[str], formats: Sequence[str]) -> bool:
    """Whether I/O ``pos`` (inputs then outputs) may take ``types[pos]`` in ``formats[pos]``, given the choices
    at positions before it: linear everywhere, ``q`` a float type, every other float tensor ``q``'s type, the
    three scalars INT32."""
    if formats[pos] != "LINEAR":
        return False
    if pos in SCALAR_POSITIONS:
        return types[pos] == SCALAR_TYPE
    if pos == 0:
        return types[0] in FLOAT_TYPES
    return pos < len(PLUGIN_INPUTS) + len(PLUGIN_OUTPUTS) and types[pos] == types[0]


# -- TensorRT classes --------------------------------------------------------------------------------------------

_CLASSES: dict[int, tuple[type, type]] = {}
_CREATORS: dict[int, Any] = {}  # the registry holds a raw pointer: keep each creator alive here


def _field_collection(trt: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    kinds = {"INT32": trt.PluginFieldType.INT32, "FLOAT32": trt.PluginFieldType.FLOAT32}
    return trt.PluginFieldCollection([trt.PluginField(name, arrays[name], kinds[FIELD_TYPES[name]])
                                      for name in FIELD_TYPES])


def plugin_classes(trt: TensorRT | Any | None = None) -> tuple[type, type]:
    """``(plugin class, creator class)`` for a TensorRT module (built once per module: the bases come from it)."""
    mod = trt_module(trt)
    if id(mod) in _CLASSES:
        return _CLASSES[id(mod)]
    aliasing = hasattr(mod, "IPluginV3OneBuildV2")  # older bindings: no aliasing, the plugin copies the cache
    plugin_base: Any = mod.IPluginV3
    core_base: Any = mod.IPluginV3OneCore
    build_base: Any = mod.IPluginV3OneBuildV2 if aliasing else mod.IPluginV3OneBuild
    runtime_base: Any = mod.IPluginV3OneRuntime
    creator_base: Any = mod.IPluginCreatorV3One

    class BlockDiffusionAttentionPlugin(plugin_base, core_base, build_base, runtime_base):
        """One layer's window write + block-diffusion attention (see the module docstring)."""

        def __init__(self, attrs: AttentionAttrs, phase: Any = None) -> None:
            plugin_base.__init__(self)
            core_base.__init__(self)
            build_base.__init__(self)
            runtime_base.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = PLUGIN_NAME, PLUGIN_NAMESPACE, \
                PLUGIN_VERSION
            self.num_outputs = len(PLUGIN_OUTPUTS)
            self.attrs, self.phase, self.aliasing = attrs, phase, aliasing
            self._arrays: dict[str, np.ndarray] = {}  # PluginField keeps a pointer into these

        def get_capability_interface(self, capability: Any) -> Any:
            return self

        def clone(self) -> Any:
            return type(self)(self.attrs, self.phase)

        def get_fields_to_serialize(self) -> Any:
            self._arrays = attrs_to_fields(self.attrs)
            return _field_collection(mod, self._arrays)

        def get_output_data_types(self, input_types: Sequence[Any]) -> list[Any]:
            return [getattr(mod.DataType, name) for name in output_types([t.name for t in input_types])]

        def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Any, expr_builder: Any) -> list[Any]:
            return [mod.DimsExprs(inputs[i]) for i in OUTPUT_SHAPE_FROM]

        def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
            descs = [d.desc for d in in_out[:pos + 1]]
            return supports_combination(pos, [d.type.name for d in descs], [d.format.name for d in descs])

        def get_aliased_input(self, output_index: int) -> int:
            return ALIASES.get(output_index, -1)

        def configure_plugin(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            check_input_shapes([tuple(d.desc.dims) for d in inputs], self.attrs)

        def on_shape_change(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            check_input_shapes([tuple(d.dims) for d in inputs], self.attrs)

        def set_tactic(self, tactic: int) -> None:
            pass

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def enqueue(self, input_desc: Sequence[Any], output_desc: Sequence[Any], inputs: Sequence[int],
                    outputs: Sequence[int], workspace: int, stream: int) -> int:
            run_plugin(self.attrs, [(p, tuple(d.dims), d.type.name) for p, d in zip(inputs, input_desc, strict=True)],
                       [(p, tuple(d.dims), d.type.name) for p, d in zip(outputs, output_desc, strict=True)], stream)
            return 0

    class BlockDiffusionAttentionCreator(creator_base):
        """Makes :class:`BlockDiffusionAttentionPlugin` from fields (the parser's at build, the engine's at load)."""

        def __init__(self) -> None:
            creator_base.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self._arrays = {name: np.zeros(0, np.int32 if kind == "INT32" else np.float32)
                            for name, kind in FIELD_TYPES.items()}
            self.field_names = _field_collection(mod, self._arrays)

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
            fields = {f.name: np.array(f.data, copy=True) for f in fc}
            return BlockDiffusionAttentionPlugin(attrs_from_fields(fields), phase)

    _CLASSES[id(mod)] = (BlockDiffusionAttentionPlugin, BlockDiffusionAttentionCreator)
    return _CLASSES[id(mod)]


def register_plugin(trt: TensorRT | Any | None = None) -> Any:
    """Register the creator with ``trt.get_plugin_registry()`` under :data:`PLUGIN_NAMESPACE` (once: later calls
    return the creator already there); returns it."""
    mod = trt_module(trt)
    registry = mod.get_plugin_registry()
    found = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if found is not None:
        return found
    creator = plugin_classes(mod)[1]()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"TensorRT refused to register {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION}")
    _CREATORS[id(mod)] = creator
    return creator


def preview_features(trt: TensorRT | Any | None = None) -> tuple[str, ...]:
    """The ``trt.PreviewFeature`` names a plugin-engine build enables: ``ALIASED_PLUGIN_IO_10_03`` where the
    plugin declares aliases (``IPluginV3OneBuildV2``), since TensorRT honours plugin I/O aliasing only with it."""
    mod = trt_module(trt)
    wanted = "ALIASED_PLUGIN_IO_10_03"
    aliasing = hasattr(mod, "IPluginV3OneBuildV2") and hasattr(getattr(mod, "PreviewFeature", None), wanted)
    return (wanted,) if aliasing else ()


# -- run time (GPU only) -----------------------------------------------------------------------------------------

_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "BF16": "<i2", "INT32": "<i4"}  # bf16 goes in as int16, viewed back


class _DeviceArray:
    """A device pointer + shape + dtype, seen by torch through ``__cuda_array_interface__`` (no copy, no sync)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], type_name: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": _TYPESTR[type_name], "data": (int(ptr), False),
                                         "version": 3, "strides": None, "stream": None}


def check_run_requirements() -> None:
    """Raise ``ImportError`` (``name``: the module) unless torch and Triton, which :func:`run_plugin` imports at
    its first enqueue, are installed: a runtime finds out when it loads a plugin engine, not mid-plan."""
    import importlib.util

    for module in ("torch", "triton"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"the {PLUGIN_NAME} plugin runs its Triton kernel through torch; {module} is not "
                              "installed", name=module)


def device_tensor(ptr: int, shape: tuple[int, ...], type_name: str) -> Any:
    """A torch CUDA tensor over TensorRT's buffer ``ptr`` (``type_name``: ``"FLOAT"``, ``"HALF"``, ``"BF16"``,
    ``"INT32"``)."""
    import torch

    tensor = torch.as_tensor(_DeviceArray(ptr, shape, type_name), device="cuda")
    return tensor.view(torch.bfloat16) if type_name == "BF16" else tensor


def run_plugin(attrs: AttentionAttrs, inputs: Sequence[tuple[int, tuple[int, ...], str]],
               outputs: Sequence[tuple[int, tuple[int, ...], str]], stream: int) -> None:
    """The plugin's work on ``stream``: ``(pointer, dims, type name)`` per input and output, in contract order."""
    import torch

    from ..kernels.block_attention import block_diffusion_attention, write_window_

    q, k_new, v_new, past_k, past_v, start, key_end, mode = (device_tensor(*io) for io in inputs)
    attn, present_k, present_v = (device_tensor(*io) for io in outputs)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        for past, present, new in ((past_k, present_k, k_new), (past_v, present_v, v_new)):
            if present.data_ptr() != past.data_ptr():  # not aliased: the present starts as a copy of the past
                present.copy_(past)
            write_window_(present, new, start)
        block_diffusion_attention(q, present_k, present_v, start, key_end, mode, attrs.block_size, attrs.scale,
                                  out=attn)
