"""An export's graph spec (``onnx_spec.json``), torch-free: what the ONNX export writes and the ONNX Runtime /
TensorRT backends, ``verify`` and ``inspect`` read.

The graph file names, the spec loader and readers of its parts (vision graphs per camera size, the image policy,
typed-slot inputs, the KV-cache I/O kind), and the plugin node's constants. The host-side work a prompt with
images needs before the graphs (patches, M-RoPE positions, image-token checks) is :mod:`blockpilot.vla.image`;
the attention modes' integer ids are :attr:`blockpilot.vla.modes.AttentionMode.id`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..vla.image_policy import ImagePolicy, ImagePolicyError, frame_line

SPEC_FILE = "onnx_spec.json"
VISION_FILE = "vision.onnx"
LM_FILE = "lm_step.onnx"
EMBED_FILE = "embed_tokens.npy"
# The lm_step's cache outputs by the spec's ``kv_io``: the window's rows (the default), or the whole cache with the
# window written (exports before the window I/O; their specs have no ``kv_io``).
KV_OUTPUTS = {"window": ("k_new", "v_new"), "full": ("present_k", "present_v")}
# Typed value slots: the lm_step graph's optional logits-mask inputs (export.typed_slots_graph writes them).
TYPED_SLOT_INPUTS = ("allowed_table", "token_class")

# The plugin variant's custom node (blockpilot.export.plugin_attention writes it, blockpilot.trt.plugin runs it):
# part of the graph format, so the exporter, the TensorRT plugin and the runtime read one definition.
PLUGIN_DOMAIN = "blockpilot"
PLUGIN_NAME = "BlockDiffusionAttention"  # the op type, and the name TensorRT finds the plugin creator by
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "blockpilot"
PLUGIN_OPSET = 1
PLUGIN_INPUTS = ("q", "k_new", "v_new", "past_k", "past_v", "start", "key_end", "mode")
PLUGIN_OUTPUTS = ("attn", "present_k", "present_v")


def load_spec(onnx_dir: str | Path) -> dict[str, Any]:
    """The spec :func:`blockpilot.export.onnx_graphs.export_onnx` wrote into ``onnx_dir``."""
    path = Path(onnx_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX export here (run blockpilot.export.export_onnx first)")
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def vision_graphs(spec_vision: dict[str, Any]) -> list[dict[str, Any]]:
    """Every vision graph of a spec's ``vision`` entry (an export before ``graphs`` existed has one)."""
    graphs = spec_vision.get("graphs")
    if graphs is None:
        return [{k: spec_vision[k] for k in ("file", "grid_thw", "image_hw", "inputs", "outputs")
                 if k in spec_vision}]
    return list(graphs)


def spec_policy(spec_vision: dict[str, Any], where: str) -> ImagePolicy:
    """The image policy an export was made for: its recorded ``policy``, or for an older export the
    processor defaults restricted to its single graph's grid."""
    if "policy" in spec_vision:
        policy = ImagePolicy.from_dict(spec_vision["policy"], where)
        graph = tuple(int(spec_vision[k]) for k in ("patch_size", "spatial_merge_size", "temporal_patch_size")
                      if k in spec_vision)
        if len(graph) == 3 and graph != (policy.patch_size, policy.merge_size, policy.temporal_patch_size):
            raise ImagePolicyError(f"{where}: the image policy's patch sizes disagree with the vision graph's "
                                   f"{graph} (patch, merge, temporal)")
        return policy
    p = int(spec_vision["patch_size"])
    _, gh, gw = (int(x) for x in spec_vision["grid_thw"])
    return ImagePolicy(patch_size=p, merge_size=int(spec_vision["spatial_merge_size"]),
                       temporal_patch_size=int(spec_vision["temporal_patch_size"]), sizes=((gh * p, gw * p),),
                       source=f"{where} (no recorded policy: its one {gh * p}x{gw * p} graph)")


def graph_has_typed_slots(spec: dict[str, Any]) -> bool:
    """Whether an export's spec declares the typed-slot inputs (exports made before them do not)."""
    names = {i["name"] for i in spec.get("lm_step", {}).get("inputs", [])}
    return all(n in names for n in TYPED_SLOT_INPUTS)


def kv_io(spec: dict[str, Any]) -> str:
    """``"window"`` when an export's lm_step returns only the window's K/V (``k_new`` / ``v_new``), ``"full"``
    for exports that return the whole cache (``present_k`` / ``present_v``; made before the window I/O). Raises
    ``ValueError`` for a spec whose lm_step outputs are neither."""
    names = {o["name"] for o in spec.get("lm_step", {}).get("outputs", [])}
    for kind, outputs in KV_OUTPUTS.items():
        if all(n in names for n in outputs):
            return kind
    raise ValueError(f"{SPEC_FILE}: the lm_step outputs {sorted(names)} have neither the window K/V "
                     f"{KV_OUTPUTS['window']} nor the whole cache {KV_OUTPUTS['full']}")


def describe_bundle_images(bundle_dir: str | Path) -> str:
    """``inspect`` lines for a bundle: the image policy and vision graphs its export recorded, and its KV cache."""
    spec_path = Path(bundle_dir) / "graphs" / "decomposed" / SPEC_FILE
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ImagePolicyError(f"{spec_path}: cannot read the export's spec ({exc})") from None
    lines = [f"kv cache     {spec.get('capacity')} slots (prompt + answer; fixed at export, --max-prompt-tokens)"]
    vision = spec.get("vision")
    if vision is None:
        return "\n".join([*lines, "images       none (text-only model)"])
    policy = spec_policy(vision, str(spec_path))
    graphs = ", ".join(f"{g['file']} {g['grid_thw'][2] * policy.patch_size}x{g['grid_thw'][1] * policy.patch_size}"
                       for g in vision_graphs(vision))
    return "\n".join([*lines, f"image policy {policy.describe()}", f"vision       {graphs}", frame_line(policy)])
