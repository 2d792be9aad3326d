"""Torch-free helpers shared by the ONNX export and the ONNX Runtime / TensorRT backends.

File names, the spec loader and the plugin node's constants, plus numpy versions of the two host-side steps a
prompt with images needs before the LM graph: image preprocessing (normalize + patchify, the layout of
:mod:`blockpilot.vla.image`) and Qwen2.5-VL's 3-D RoPE positions (:mod:`blockpilot.vla.rope_index`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..vla.image_policy import ImagePolicy

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

# The CLIP normalization (the default of blockpilot.vla.image_policy), as float32 arrays.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def load_spec(onnx_dir: str | Path) -> dict[str, Any]:
    """The spec :func:`blockpilot.export.onnx_graphs.export_onnx` wrote into ``onnx_dir``."""
    path = Path(onnx_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX export here (run blockpilot.export.export_onnx first)")
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def image_patches(image: npt.NDArray[np.uint8], patch_size: int, merge_size: int, temporal_patch_size: int, *,
                  policy: ImagePolicy | None = None) -> tuple[FloatArray, tuple[int, int, int]]:
    """One ``HxWx3`` uint8 image -> float32 patches ``(N, 3*T*p*p)`` in merged-token order, and its grid.

    ``policy`` (default: the processor defaults for these patch sizes) picks the target size
    (:meth:`~blockpilot.vla.image_policy.ImagePolicy.target_size`) and the normalization. An image already at
    its target size is handled in numpy alone; one that needs the antialiased bicubic resize falls back to
    :func:`blockpilot.vla.image.resize_bicubic` (torch), so both backends see the same pixels.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    if policy is None:
        policy = ImagePolicy(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    elif (policy.patch_size, policy.merge_size, policy.temporal_patch_size) != (patch_size, merge_size,
                                                                               temporal_patch_size):
        raise ValueError(f"{policy.source}: image policy patch sizes disagree with the vision graph's "
                         f"({patch_size}, {merge_size}, {temporal_patch_size})")
    h, w = policy.target_size(image.shape[0], image.shape[1])
    if image.shape[:2] != (h, w):
        from ..vla.image import resize_bicubic  # torch: only for images not already at the target size

        image = resize_bicubic(image, h, w)
    mean = np.asarray(policy.image_mean, dtype=np.float32)
    std = np.asarray(policy.image_std, dtype=np.float32)
    x = image.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - mean[:, None, None]) / std[:, None, None]
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # merged row, merged col, row/col in merge, channel, patch row/col
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    patches = np.ascontiguousarray(x.reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size))
    return patches.astype(np.float32, copy=False), (1, gh, gw)


def mrope_positions_np(token_ids: IntArray, grids: list[tuple[int, int, int]], image_token_id: int,
                       merge_size: int) -> tuple[IntArray, int]:
    """3-D positions ``(3, 1, T)`` and the rope delta of one prompt (batch one), as
    :func:`blockpilot.vla.rope_index.mrope_positions` computes them."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    counts = [t * h * w // (merge_size * merge_size) for t, h, w in grids]
    is_image = ids == image_token_id
    if int(is_image.sum()) != sum(counts):
        raise ValueError(f"the prompt holds {int(is_image.sum())} image token(s) but the images need {sum(counts)}")
    length = ids.shape[0]
    positions = np.empty((3, length), dtype=np.int64)
    slot = pos = image = 0
    while slot < length:
        if not is_image[slot]:
            run = slot
            while run < length and not is_image[run]:
                run += 1
            positions[:, slot:run] = np.arange(pos, pos + run - slot)
            pos += run - slot
            slot = run
            continue
        t, h, w = grids[image]
        gh, gw = h // merge_size, w // merge_size
        n = counts[image]
        if slot + n > length or not is_image[slot:slot + n].all():
            raise ValueError(f"image {image} needs {n} consecutive image tokens at token {slot}")
        ti, ri, ci = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, slot:slot + n] = np.stack((ti.reshape(-1), ri.reshape(-1), ci.reshape(-1))) + pos
        slot, pos = slot + n, pos + max(t, gh, gw)
        image += 1
    return positions[:, None, :], pos - length


def continuation_positions_np(start: int, length: int, delta: int) -> IntArray:
    """Positions ``(3, 1, length)`` of slots ``start .. start+length-1`` after a prompt of rope delta ``delta``."""
    row = np.arange(start + delta, start + delta + length, dtype=np.int64)
    return np.broadcast_to(row, (3, 1, length)).copy()


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
        return ImagePolicy.from_dict(spec_vision["policy"], where)
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
