"""The decoder LM written for decode: the forward of :class:`~blockpilot.vla.lm.DecoderLM` over a static KV cache,
every shape fixed by the caller and every position-dependent value read from device tensors.

One forward takes the window's embeddings ``(B, T, hidden)``, its RoPE positions, the cache slot of each window
position (``slots``, ``(T,)``) and three one-element int32 device tensors ``start``, ``key_end`` and ``mode``
(0 causal, 1 block, 2 bidirectional). Per layer the window's K/V are written into the cache in place
(``index_copy_`` at ``slots``) and attention runs over the cache slots ``[0, key_end)`` the mode allows, through
``attention`` (the Triton kernel :func:`blockpilot.kernels.block_attention.block_diffusion_attention` or its
torch reference), with the batch folded into the heads (head ``b * H + h`` reads K/V head ``b * Hkv + h // G``).
The Triton kernel splits the keys over several programs when a step alone would not fill the GPU; its split-KV
workspace is carved from one float32 buffer owned here, grown only outside a CUDA graph capture (every captured
step first runs eagerly, which grows it) and never freed while a graph captured over it may replay.
A draft (``write_kv=False``) saves the slots it overwrites and puts them back after the layer's attention, so the
cache is left as it was. Nothing here syncs with the host, so a forward can be captured in a CUDA graph.

``prefix_reuse`` (off by default, :class:`PrefixStep`): FlashBlock-style reuse of the block-external attention
inside one block. A draft in block or bidirectional mode splits each layer's attention into the prefix part
(keys ``[0, start)``, which every such query sees in full) and the in-block part (keys ``[start, key_end)``, under
the mode's mask), each as a state with its log-sum-exp, and merges them
(:func:`blockpilot.kernels.merge.merge_attention_states_ref`). The first draft at a window stores every layer's
prefix state; a later draft at the same window reads it back and computes only the in-block part. That is exact
when the queries are the same and an APPROXIMATION otherwise (the prefix part keeps the earlier draft's queries).
The split runs in torch (float32) with host ints, so such a step runs eagerly, never in a CUDA graph.

The math is the module's own, in the same order (RMSNorm in float32, RoPE, SwiGLU); the linears are the model's
weights in the backend's dtype, or :class:`~blockpilot.runtime.cuda_fp8.Fp8Linear`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..vla.lm import DecoderLM, RotaryEmbedding, rotate_half
from .cuda_fp8 import Fp8Linear
from .sampling import gumbel_keys

AttentionFn = Callable[..., torch.Tensor]
EpilogueFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class PrefixStep:
    """One forward with the prefix split (see the module doc): ``reuse`` False computes and stores each layer's
    prefix state, True reads the stored one. ``start``, ``key_end``, ``mode`` are the step's, as host ints."""

    reuse: bool
    start: int
    key_end: int
    mode: int


def attention_state(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 attention state ``(out (1, H, T, D), lse (1, H, T))`` of ``q`` over ``keys``/``values``
    ``(1, Hkv, N, D)`` (grouped heads), ``allowed`` ``(T, N)`` or ``None`` (all). No key: ``lse = -inf``."""
    groups = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)
    v = values.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.transpose(2, 3)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    if scores.shape[-1] == 0:
        return torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device), lse
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(weights, v), lse


class Linear(Protocol):
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor: ...


class DenseLinear:
    __slots__ = ("bias", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear


def top1_prob_ref(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top1, prob)`` of ``logits`` ``(..., V)`` with ``mask_id`` excluded: the torch backend's math (float32
    softmax, then max); :func:`blockpilot.kernels.top1.top1_prob` is the fused kernel."""
    scores = logits.to(torch.float32, copy=True)
    scores[..., mask_id] = float("-inf")
    prob, top1 = scores.softmax(-1).max(-1)
    return top1, prob


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class DecodeLM:
    """The weights of a :class:`DecoderLM` on ``device`` in ``dtype`` (the model's tensors when they already are)
    and the decode forward over them. ``fp8``: the seven linears of every layer become :class:`Fp8Linear`
    (embeddings, norms and the LM head stay in ``dtype``)."""

    def __init__(self, lm: DecoderLM, *, device: torch.device, dtype: torch.dtype, attention: AttentionFn,
                 epilogue: EpilogueFn, block_size: int, mask_id: int, fp8: bool = False,
                 fp8_per_channel: bool = True, activation_scale: str = "dynamic", fp8_matmul: str = "auto") -> None:
        self.config = cfg = lm.config
        self._prefix_states: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, from the storing draft
        self.attention, self.epilogue = attention, epilogue
        self.block_size, self.mask_id = block_size, mask_id
        self.dtype, self.device = dtype, device
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.rotary = RotaryEmbedding(cfg)
        self._split_kv = "workspace" in inspect.signature(attention).parameters  # the Triton kernel
        self._workspace = torch.empty(0, dtype=torch.float32, device=device)
        self._retired: list[torch.Tensor] = []  # outgrown workspaces that captured graphs may still write
        converted: dict[int, torch.Tensor] = {}  # a tied head and embedding stay one tensor

        def dense(t: torch.Tensor) -> torch.Tensor:
            key = id(t)
            if key not in converted:
                converted[key] = t.detach().to(device=device, dtype=dtype)
            return converted[key]

        def linear(name: str, module: nn.Module) -> Linear:
            assert isinstance(module, nn.Linear)
            if fp8:
                return Fp8Linear.from_linear(name, module, device=device, out_dtype=dtype, per_channel=fp8_per_channel,
                                             activation_scale=activation_scale, matmul=fp8_matmul)
            return DenseLinear(dense(module.weight), None if module.bias is None else dense(module.bias))

        self.embed = dense(lm.embed_tokens.weight)
        self.lm_head = dense(lm.lm_head.weight)
        self.norm = dense(lm.norm.weight)
        self.layers: list[LayerWeights] = []
        for i, layer in enumerate(lm.layers):
            mods = {n: layer.get_submodule(n) for n in LINEARS}
            q, k, v, o, gate, up, down = (linear(f"lm.layers.{i}.{n}", mods[n]) for n in LINEARS)
            norms = [layer.get_parameter(f"{n}.weight") for n in ("input_layernorm", "post_attention_layernorm")]
            self.layers.append(LayerWeights(dense(norms[0]), dense(norms[1]), q, k, v, o, gate, up, down))

    def weight_bytes(self) -> int:
        """Bytes of the weights one forward reads: every layer's linears and norms, the final norm, the LM head
        (the embedding rows of a window are negligible)."""
        total = self.lm_head.numel() * self.lm_head.element_size() + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            for part in (layer.input_norm, layer.post_norm):
                total += part.numel() * part.element_size()
            for lin in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
                w = getattr(lin, "weight", None)
                b = getattr(lin, "bias", None)
                assert isinstance(w, torch.Tensor)
                total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        return total

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, start: torch.Tensor,
                key_end: torch.Tensor, mode: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                write_kv: bool, valid: torch.Tensor | None = None, prefix: PrefixStep | None = None) -> torch.Tensor:
        """Final normed hidden states ``(B, T, hidden)`` of the window ``x``; ``positions`` ``(B, T)`` or
        ``(3, B, T)`` (M-RoPE); caches ``(layers, B, Hkv, slots, D)`` (a view over the first ``B`` rows is fine).
        ``valid`` ``(T,)`` bool marks the real positions of a padded window (for FP8's dynamic scales).
        ``prefix``: split the attention at ``start`` and store or reuse the prefix states (module doc)."""
        cfg = self.config
        b, t, _ = x.shape
        rows = None if valid is None else valid.to(torch.float32)[None, :, None].expand(b, t, 1).reshape(b * t, 1)
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self.rotary(positions, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        split_kv = self._split_kv_options(b * heads, b * kv_heads, t, k_cache.shape[3])
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            q = layer.q(h, rows).view(b, t, heads, d).transpose(1, 2)
            k = layer.k(h, rows).view(b, t, kv_heads, d).transpose(1, 2)
            v = layer.v(h, rows).view(b, t, kv_heads, d).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kc, vc = k_cache[i], v_cache[i]
            saved = None if write_kv else (kc.index_select(2, slots), vc.index_select(2, slots))
            kc.index_copy_(2, slots, k.to(kc.dtype))
            vc.index_copy_(2, slots, v.to(vc.dtype))
            capacity = kc.shape[2]
            if prefix is not None:
                out = self._split_attention(i, q.reshape(1, b * heads, t, d), kc.view(1, b * kv_heads, capacity, d),
                                            vc.view(1, b * kv_heads, capacity, d), prefix)
            else:
                out = self.attention(q.reshape(1, b * heads, t, d), kc.view(1, b * kv_heads, capacity, d),
                                     vc.view(1, b * kv_heads, capacity, d), start, key_end, mode, self.block_size,
                                     self.scale, **split_kv)
            if saved is not None:
                kc.index_copy_(2, slots, saved[0])
                vc.index_copy_(2, slots, saved[1])
            out = out.to(x.dtype).view(b, heads, t, d).transpose(1, 2).reshape(b, t, heads * d)
            x = x + layer.o(out, rows)
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = x + layer.down(F.silu(layer.gate(h, rows)) * layer.up(h, rows), rows)
        return rms_norm(x, self.norm, cfg.rms_norm_eps)

    def clear_prefix(self) -> None:
        """Drop the stored prefix states (the next split forward must store)."""
        self._prefix_states = []

    def _split_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         p: PrefixStep) -> torch.Tensor:
        """Layer ``layer``'s attention as the merge of the prefix state (stored, or computed and stored) and the
        in-block state over ``[start, key_end)``; float32 ``(1, H, T, D)``."""
        from ..kernels.merge import merge_attention_states_ref
        from ..kernels.reference import allowed_keys

        if p.reuse:
            if layer >= len(self._prefix_states):
                raise RuntimeError("prefix reuse without stored prefix states: the storing draft must run first")
            pre = self._prefix_states[layer]
        else:
            if layer == 0:
                self._prefix_states = []
            pre = attention_state(q, k[:, :, : p.start], v[:, :, : p.start], None, self.scale)
            self._prefix_states.append(pre)
        q_slots = p.start + torch.arange(q.shape[2], device=q.device)
        allowed = allowed_keys(q_slots, p.key_end, p.mode, self.block_size)[:, p.start:]
        inner = attention_state(q, k[:, :, p.start: p.key_end], v[:, :, p.start: p.key_end], allowed, self.scale)
        return merge_attention_states_ref(pre[0], pre[1], inner[0], inner[1])[0]

    def _split_kv_options(self, heads: int, kv_heads: int, t: int, capacity: int) -> dict[str, Any]:
        """The Triton kernel's split count for this shape and its workspace (views over ``self._workspace``)."""
        if not self._split_kv:
            return {}
        from ..kernels.block_attention import attention_workspace, default_num_splits, workspace_numel

        d = self.config.head_dim
        splits = default_num_splits(heads, kv_heads, t, capacity, self.device)
        if splits == 1:
            return {"num_splits": 1}
        need = workspace_numel(heads, t, d, splits)
        if self._workspace.numel() < need:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"the split-KV workspace for {heads} heads x {t} positions must exist before a "
                                   "CUDA graph capture: run the step eagerly first")
            self._retired.append(self._workspace)
            self._workspace = torch.empty(max(need, 2 * self._workspace.numel()), dtype=torch.float32,
                                          device=self.device)
        return {"workspace": attention_workspace(heads, t, d, splits, self.device, storage=self._workspace)}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    def head(self, hidden: torch.Tensor, sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(top1, prob, sampled)`` ``(B, T)`` on the device. ``sampling``: ``(seeds (B,) int64, slots (T,) int64,
        temperature (1,) float32)``, drawn with the counter-based Gumbel keys of :mod:`blockpilot.runtime.sampling`
        (the torch backend's draw, token for token)."""
        logits = self.logits(hidden)
        top1, prob = self.epilogue(logits, self.mask_id)
        if sampling is None:
            return top1, prob, None
        seeds, slots, temperature = sampling
        scores = logits.float()
        scores[..., self.mask_id] = float("-inf")
        keys = gumbel_keys(seeds, slots, scores.shape[-1])
        return top1, prob, (scores / temperature + keys).argmax(-1)
