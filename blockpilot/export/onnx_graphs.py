"""Export a :class:`VLAModel` to the ONNX graphs the ONNX Runtime backend runs.

Three artifacts land in ``out_dir``:

``vision.onnx``
    ``patches`` ``(N, C*T*p*p)`` float32 -> ``features`` ``(N / merge², hidden)`` for ONE image of
    the grid fixed at export (``image_hw``, default the size of the model's cameras). The window
    layout depends only on the grid, so it is baked into the graph as constants. Images are
    independent inside the tower (attention never crosses an image), so a prompt with several
    cameras runs the graph once per image and concatenates the features.
``lm_step.onnx``
    One decoder forward over a window of ``T`` tokens (dynamic) at cache slots ``start ..``:
    inputs ``inputs_embeds`` ``(1, T, hidden)``, ``position_ids`` ``(3, 1, T)`` (M-RoPE; text-only
    LMs get the same three rows), ``start``, ``key_end`` and ``mode`` (int64 scalars) and the
    fixed-capacity cache ``past_k`` / ``past_v`` ``(layers, 1, kv_heads, capacity, head_dim)``, read in
    place: the graph gathers only the visible slots ``[0, key_end)`` and never copies the rest.
    Outputs ``top1`` / ``prob`` ``(1, T)`` (argmax and its softmax probability, the mask token
    excluded) and ``k_new`` / ``v_new`` ``(layers, 1, kv_heads, T, head_dim)``: only the window's K/V
    (after RoPE), which the backend writes into its cache at ``start`` for a committed step
    (``kv_io: "window"`` in the spec; :mod:`blockpilot.runtime.kv_window`). Queries see key slots
    ``< key_end`` allowed by ``mode`` (0 causal, 1 block, 2 bidirectional; the same slot rules as
    :func:`blockpilot.vla.masks.attention_mask`), the window's own slots taken from the window's K/V, so a
    ``write_kv=False`` step is the same graph with ``key_end = start + T`` and the window dropped.
    Exports before the window I/O (``kv_io="full"``, still written on request so old bundles can be checked)
    returned the whole cache with the window written as ``present_k`` / ``present_v`` instead.
``embed_tokens.npy``
    The token embedding table; the backend looks ids up on the host and writes image features
    over the image tokens before the LM graph runs. Not written for a tied embedding: the spec's ``embed``
    names the LM head initializer of ``lm_step.onnx`` that holds it (:mod:`blockpilot.formats.embedding_table`).

``onnx_spec.json`` records the I/O spec and the few config values the backend needs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..atomic_io import atomic_write
from ..formats.embedding_table import locate_tied_embedding
from ..formats.onnx_spec import EMBED_FILE, KV_OUTPUTS, LM_FILE, SPEC_FILE
from ..vla.config import ModelConfig
from ..vla.image_grid import smart_resize
from ..vla.image_policy import ImagePolicy
from ..vla.lm import DecoderLayer, DecoderLM, rotate_half
from ..vla.model import VLAModel
from ..vla.modes import AttentionMode
from .embedding_rows import Float32Rows
from .fp32_graph import finish_traced_graph, traced_scalars
from .typed_slots_graph import TYPED_SLOT_AXES, TYPED_SLOT_INPUTS, add_typed_slot_defaults, typed_slot_specs

OPSET = 17
DEFAULT_IMAGE_HW = (112, 112)
ATTENTION_VARIANTS = ("decomposed", "plugin")
KV_IO = ("window", "full")  # the lm_step's cache outputs: the window's rows (k_new / v_new), or the whole cache


class LMStep(nn.Module):
    """The decoder forward with a decomposed attention (MatMul, additive mask, Softmax) that writes
    the window into the fixed-capacity cache and reads back only the visible slots ``[0, key_end)``.

    With ``attention="plugin"`` each layer's cache write + attention is instead one custom
    ``blockpilot::BlockDiffusionAttention`` node (:mod:`blockpilot.export.plugin_attention`)."""

    vocab_bias: torch.Tensor

    def __init__(self, lm: DecoderLM, mask_id: int, block_size: int, attention: str = "decomposed",
                 kv_io: str = "window") -> None:
        super().__init__()
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        if kv_io not in KV_IO:
            raise ValueError(f"kv_io must be one of {KV_IO}, got {kv_io!r}")
        self.kv_io = kv_io
        self.lm = lm
        self.block_size = block_size
        self.attention = attention
        cfg = lm.config
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = torch.zeros(cfg.vocab_size)
        bias[mask_id] = float("-inf")  # the mask token is an input marker, never an answer
        self.register_buffer("vocab_bias", bias, persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, start: torch.Tensor,
                key_end: torch.Tensor, mode: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, allowed_table: torch.Tensor | None = None, token_class: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = inputs_embeds
        t = x.shape[1]
        capacity = past_k.shape[3]
        offsets = torch.arange(t, device=x.device)
        q_slots = start + offsets  # (T,)
        k_slots = torch.arange(capacity, device=x.device)  # (C,)
        # Attention reads only the visible slots [0, key_end): a Range + Gather, dynamic like T.
        visible = torch.arange(key_end, device=x.device)  # type: ignore[call-overload]  # a tensor end traces as Range
        q, k = q_slots[:, None], visible[None, :]
        causal = k <= q
        block = torch.div(k, self.block_size, rounding_mode="floor") <= torch.div(q, self.block_size,
                                                                                  rounding_mode="floor")
        # Boolean Where has no ONNX Runtime CPU kernel: select the mode's rule with and/or instead.
        allowed = (((mode == AttentionMode.CAUSAL.id) & causal) | ((mode == AttentionMode.BLOCK.id) & block)
                   | (mode == AttentionMode.BIDIRECTIONAL.id))
        neg = torch.full_like(allowed, float("-inf"), dtype=x.dtype)
        mask = torch.where(allowed, torch.zeros_like(neg), neg)  # (T, key_end) additive
        # Cache slot c takes the window's row c - start when start <= c < start + T: over every slot for the
        # whole-cache present (kv_io="full"), over the visible slots only for the window I/O.
        rel = (k_slots if self.kv_io == "full" else visible) - start
        in_window = ((rel >= 0) & (rel < t))[None, None, :, None]
        gather = rel.clamp(0, t - 1)
        # The graph always takes (3, 1, T); a 1-D RoPE LM reads the first row.
        pos = position_ids if self.lm.config.mrope_section is not None else position_ids[0]
        cos, sin = self.lm.rotary(pos, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        scale = 1.0 / math.sqrt(self.head_dim)
        groups = self.num_heads // self.num_kv_heads
        presents_k, presents_v = [], []
        if self.attention == "plugin":
            from .plugin_attention import plugin_attention, plugin_scalars

            scalars = plugin_scalars(start, key_end, mode)
        for i, module in enumerate(self.lm.layers):
            layer = cast(DecoderLayer, module)
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            qh = attn.q_proj(h).view(1, t, self.num_heads, self.head_dim).transpose(1, 2)
            kh = attn.k_proj(h).view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vh = attn.v_proj(h).view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            qh = qh * cos + rotate_half(qh) * sin
            kh = kh * cos + rotate_half(kh) * sin
            if self.attention == "plugin":
                out, new_k, new_v = plugin_attention(qh, kh, vh, past_k[i], past_v[i], *scalars,
                                                     block_size=self.block_size, scale=scale)
            elif self.kv_io == "full":
                new_k = torch.where(in_window, kh.index_select(2, gather), past_k[i])
                new_v = torch.where(in_window, vh.index_select(2, gather), past_v[i])
                keys, values = new_k.index_select(2, visible), new_v.index_select(2, visible)
            else:  # read the visible cache rows in place; the window's own slots from its K/V
                keys = torch.where(in_window, kh.index_select(2, gather), past_k[i].index_select(2, visible))
                values = torch.where(in_window, vh.index_select(2, gather), past_v[i].index_select(2, visible))
            if self.attention != "plugin":
                if groups > 1:
                    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
                scores = torch.matmul(qh, keys.transpose(2, 3)) * scale + mask
                out = torch.matmul(torch.softmax(scores, dim=-1), values)
            presents_k.append(new_k if self.kv_io == "full" else kh)
            presents_v.append(new_v if self.kv_io == "full" else vh)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm.logits(self.lm.norm(x)).float() + self.vocab_bias
        if allowed_table is not None and token_class is not None:  # typed slots (export.typed_slots_graph)
            logits = torch.where(allowed_table[token_class], logits, torch.full_like(logits[:1, :1, :1], -math.inf))
        prob, top1 = torch.softmax(logits, dim=-1).max(dim=-1)
        return top1, prob, torch.stack(presents_k), torch.stack(presents_v)


def image_grid(config: ModelConfig, image_hw: tuple[int, int],
               policy: ImagePolicy | None = None) -> tuple[int, int, int]:
    """``(t, h, w)`` patch grid of one ``image_hw`` camera image after the processor's resize."""
    vision = config.vision
    if vision is None:
        raise ValueError("the model has no vision tower")
    if policy is not None:
        return policy.grid(*image_hw)
    h, w = smart_resize(image_hw[0], image_hw[1], vision.patch_size * vision.spatial_merge_size)
    return 1, h // vision.patch_size, w // vision.patch_size


def _export_vision(model: VLAModel, out: Path, image_sizes: Sequence[tuple[int, int]],
                   policy: ImagePolicy | None, opset: int, trace_dtype: torch.dtype) -> dict[str, Any]:
    from .vision_graphs import export_vision_graphs

    return export_vision_graphs(model, out, image_sizes, policy, opset, trace_dtype=trace_dtype)


def _trace_dtype(model: VLAModel, dtype: str) -> torch.dtype:
    """The dtype ``export_onnx`` traces ``model`` in: its parameters' (``auto``), or float32."""
    if dtype == "float32":
        return torch.float32
    if dtype != "auto":
        raise ValueError(f"export dtype must be 'auto' or 'float32', got {dtype!r}")
    held = {p.dtype for p in model.parameters()}
    if held <= {torch.bfloat16} or held <= {torch.float16}:
        return next(iter(held), torch.float32)
    return torch.float32  # float32, or mixed: the float32 path


def _spec(name: str, shape: list[int | str], dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype}


def export_onnx(model: VLAModel, out_dir: str | Path, capacity: int, *,
                image_hw: tuple[int, int] = DEFAULT_IMAGE_HW, opset: int = OPSET,
                attention: str = "decomposed", image_sizes: Sequence[tuple[int, int]] | None = None,
                policy: ImagePolicy | None = None, kv_io: str = "window", dtype: str = "auto") -> dict[str, Any]:
    """Write ``vision.onnx`` (models with a vision tower), ``lm_step.onnx``, ``embed_tokens.npy`` and
    ``onnx_spec.json`` into ``out_dir``; check each graph with ``onnx.checker``; return the spec.

    ``image_sizes`` (camera ``(height, width)`` sizes, default ``[image_hw]``) are resized by ``policy`` (default:
    the processor defaults) and each distinct resized grid gets its own vision graph (:mod:`.vision_graphs`).

    ``attention="plugin"`` writes the LM step with custom attention nodes instead (use
    :func:`blockpilot.export.plugin_attention.export_plugin_graph`, which also records the variant).

    ``kv_io="full"`` writes the whole-cache ``present_k`` / ``present_v`` outputs of exports made before the
    window I/O (only to check that such bundles still run; every runtime prefers the default ``"window"``).

    ``dtype="auto"`` traces the model in the dtype it is held in: a bfloat16/float16 model (as loaded from a bf16 /
    fp16 checkpoint) is traced as it is, never copied to float32, and each graph is then widened to float32
    (:func:`blockpilot.export.fp32_graph.to_float32_graph`, exact); a float32 model takes the float32 path unchanged.
    ``dtype="float32"`` converts the model to float32 first (the path of every export before, kept to compare).
    Either way the graphs' inputs, outputs and weights are float32."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    trace_dtype = _trace_dtype(model, dtype)
    model = model.eval() if trace_dtype != torch.float32 else model.eval().float()
    lm_cfg = config.lm
    cache_dims = [lm_cfg.num_layers, 1, lm_cfg.num_kv_heads, capacity, lm_cfg.head_dim]
    cache_shape: list[int | str] = list(cache_dims)
    out_shape: list[int | str] = cache_shape if kv_io == "full" else [*cache_dims[:3], "T", cache_dims[4]]
    step = LMStep(model.lm, config.tokens.mask, config.diffusion.block_size, attention, kv_io).eval()
    extra: dict[str, Any] = {}
    if attention == "plugin":
        from .plugin_attention import PLUGIN_DOMAIN, PLUGIN_OPSET

        extra["custom_opsets"] = {PLUGIN_DOMAIN: PLUGIN_OPSET}
    t = 5
    example = (
        torch.zeros(1, t, lm_cfg.hidden_size, dtype=trace_dtype),
        torch.arange(t).view(1, 1, t).expand(3, 1, t).contiguous(),
        torch.tensor(0, dtype=torch.int64), torch.tensor(t, dtype=torch.int64), torch.tensor(0, dtype=torch.int64),
        torch.zeros(cache_dims, dtype=trace_dtype), torch.zeros(cache_dims, dtype=trace_dtype),
        torch.ones(2, lm_cfg.vocab_size, dtype=torch.bool), torch.zeros(1, t, dtype=torch.int64),  # typed slots
    )
    lm_inputs = ["inputs_embeds", "position_ids", "start", "key_end", "mode", "past_k", "past_v", *TYPED_SLOT_INPUTS]
    kv_out = list(KV_OUTPUTS[kv_io])
    lm_outputs = ["top1", "prob", *kv_out]
    window_axes = {name: {3: "T"} for name in kv_out} if kv_io == "window" else {}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer flags shape checks it folds to constants; the graph's dynamic axes are only T.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(step, example, str(out / LM_FILE), input_names=lm_inputs, output_names=lm_outputs,
                          dynamic_axes={"inputs_embeds": {1: "T"}, "position_ids": {2: "T"}, "top1": {1: "T"},
                                        "prob": {1: "T"}, **TYPED_SLOT_AXES, **window_axes},
                          opset_version=opset, dynamo=False, **extra)
    add_typed_slot_defaults(out / LM_FILE, lm_cfg.vocab_size)
    widen = trace_dtype != torch.float32
    scalars = traced_scalars(step, example) if widen else ()  # restored unrounded in the float32 graph
    finish_traced_graph(out / LM_FILE, widen=widen, scalars=scalars)
    # Row blocks widened to float32 as they are read: no float32 copy of the table (151,936 rows at 1.5B-7B).
    embedding = Float32Rows(model.lm.embed_tokens.weight.detach())
    # A tied head already holds the table in lm_step.onnx (checked value for value): the bundle keeps that one copy.
    tied = locate_tied_embedding(out / LM_FILE, embedding) if lm_cfg.tie_word_embeddings else None
    (out / EMBED_FILE).unlink(missing_ok=True)
    if tied is None:
        embedding.save_npy(out / EMBED_FILE)
    del embedding
    spec: dict[str, Any] = {
        "format": 1,
        "opset": opset,
        "capacity": capacity,
        "batch": 1,
        "mode_ids": AttentionMode.ids(),
        "block_size": config.diffusion.block_size,
        "vocab_size": lm_cfg.vocab_size,
        "hidden_size": lm_cfg.hidden_size,
        "mask_id": config.tokens.mask,
        "image_token_id": config.tokens.image,
        **({"embed": tied} if tied is not None else {"embed_file": EMBED_FILE}),
        "lm_step": {
            "file": LM_FILE,
            "inputs": [_spec("inputs_embeds", [1, "T", lm_cfg.hidden_size], "float32"),
                       _spec("position_ids", [3, 1, "T"], "int64"), _spec("start", [], "int64"),
                       _spec("key_end", [], "int64"), _spec("mode", [], "int64"),
                       _spec("past_k", cache_shape, "float32"), _spec("past_v", cache_shape, "float32"),
                       *typed_slot_specs(lm_cfg.vocab_size)],
            "outputs": [_spec("top1", [1, "T"], "int64"), _spec("prob", [1, "T"], "float32"),
                        *(_spec(name, out_shape, "float32") for name in kv_out)],
        },
        "kv_io": kv_io,
        "vision": None,
    }
    vision = config.vision
    if vision is not None and model.visual is not None:
        spec["vision"] = _export_vision(model, out, image_sizes or (image_hw,), policy, opset, trace_dtype)
    atomic_write(out / SPEC_FILE, json.dumps(spec, indent=2) + "\n")
    return spec

