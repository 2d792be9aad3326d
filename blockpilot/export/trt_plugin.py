"""Engines of the plugin graph: :func:`build_plugin_engine` registers the ``BlockDiffusionAttention`` plugin and
builds with TensorRT proper (JetPack's 10.x, 11.x). TensorRT-RTX has the plugin classes but builds no plugin
layers, and its ONNX parser aborts the process on a custom-domain node, so it never sees a plugin graph.

The plugin itself (classes, creator, registration, its field / shape / type rules and its GPU work) lives in
:mod:`blockpilot.trt.plugin`, shared with the runtime that deserializes plugin engines; its names are
re-exported here for existing callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..trt.compat import TensorRT, load_tensorrt

# The plugin moved to blockpilot.trt.plugin (the runtime registers it too); its names stay importable from here.
from ..trt.plugin import *  # noqa: F403
from ..trt.plugin import preview_features, register_plugin
from .trt_build import BuildReport, PluginGraphError, Profiles, build_engine, check_buildable, profiles_from_spec


def plugin_profiles(spec: Mapping[str, Any], opt_tokens: int | None = None) -> dict[str, Any]:
    """:func:`profiles_from_spec` for the plugin graph: there ``key_end`` only feeds the plugin (no ``Range``), so
    it is an ordinary scalar input with no range to give."""
    profiles = profiles_from_spec(spec, "lm_step", opt_tokens)
    profiles.pop("key_end", None)
    return profiles


def build_plugin_engine(onnx_path: str | Path, engine_path: str | Path, *, profiles: Profiles | None = None,
                        spec: Mapping[str, Any] | None = None, trt: TensorRT | None = None,
                        **kwargs: Any) -> BuildReport:
    """Register the plugin and build a plugin graph with :func:`blockpilot.export.trt_build.build_engine`
    (``profiles`` default to :func:`plugin_profiles` of ``spec``; ``kwargs`` go to ``build_engine``), with the
    preview feature that lets the plugin alias its caches where the bindings offer it (:func:`preview_features`).

    Raises :class:`PluginGraphError` with TensorRT-RTX, which builds no plugin layers (never handing it the graph:
    its parser aborts the process on a custom-domain node)."""
    trt = trt or load_tensorrt()
    if trt.is_rtx:
        check_buildable(onnx_path, trt.flavor)  # names the plugin nodes when the graph has them
        raise PluginGraphError(f"{onnx_path}: TensorRT-RTX {trt.version} builds no plugin layers; build plugin "
                               "engines where TensorRT proper is installed (a Jetson)")
    register_plugin(trt)
    if profiles is None and spec is not None:
        profiles = plugin_profiles(spec)
    kwargs.setdefault("compute_capability", None)
    kwargs.setdefault("preview_features", preview_features(trt))
    return build_engine(onnx_path, engine_path, profiles=profiles, trt=trt, **kwargs)
