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

At batch one the launches, not the bytes, set the time of everything but the GEMMs, so a layer is few launches:
q/k/v are one GEMM and gate/up another (:class:`LayerWeights`), and with the Triton kernels the residual add and
RMSNorm, RoPE with the cache write (and a draft's save), and SwiGLU are one fused kernel each
(:mod:`blockpilot.kernels.fused`, the same roundings as the torch ops); the attention kernel writes its output
rows in the layout the o projection reads. On an H200 that took a 3B-shape block step from 7.2 to 3.5 ms.

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
from .cuda_fp8 import Fp8Linear, modelopt_scales, weight_amax
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


def concat_dense(parts: list[DenseLinear]) -> DenseLinear:
    """One linear whose output is the parts' outputs side by side (a part without a bias adds zeros)."""
    biases = [p.bias for p in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else p.weight.new_zeros(p.weight.shape[0]) for p, b in zip(parts, biases, strict=True)])
    return DenseLinear(torch.cat([p.weight for p in parts]), bias)


@dataclass
class LayerWeights:
    """One layer: ``qkv`` is the q, k and v projections as one GEMM (outputs ``[q | k | v]``), ``gate_up`` the
    gate and up projections (``[gate | up]``): at batch one each GEMM launch reads its weights once."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
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

        def group(prefix: str, mods: dict[str, nn.Module], names: tuple[str, ...]) -> Linear:
            """The linears ``names`` (one input) as one GEMM. FP8 per tensor without modelopt scales quantizes the
            stacked weight with one scale, so the GEMM takes tensor-wise scales (measured ~2.5x faster than row-wise
            at batch one on an H200); otherwise each part keeps its own scales (rows of a per-channel GEMM)."""
            parts = [mods[n] for n in names]
            if fp8 and not fp8_per_channel and activation_scale == "dynamic" \
                    and all(modelopt_scales(f"{prefix}.{n}", m) is None for n, m in zip(names, parts, strict=True)):
                weight = torch.cat([m.get_parameter("weight").detach().to(device, torch.float32) for m in parts])
                biases = [getattr(m, "bias", None) for m in parts]
                bias = None if all(b is None for b in biases) else torch.cat(
                    [b.detach().to(device) if b is not None else torch.zeros(m.get_parameter("weight").shape[0],
                                                                            device=device)
                     for m, b in zip(parts, biases, strict=True)])
                return Fp8Linear(weight, weight_amax(weight, per_channel=False), bias, input_amax=None, out_dtype=dtype,
                                 matmul=fp8_matmul)
            built = [linear(f"{prefix}.{n}", m) for n, m in zip(names, parts, strict=True)]
            return Fp8Linear.concat(built) if fp8 else concat_dense(built)  # type: ignore[arg-type]

        self.embed = dense(lm.embed_tokens.weight)
        self.lm_head = dense(lm.lm_head.weight)
        self.norm = dense(lm.norm.weight)
        self.layers: list[LayerWeights] = []
        for i, layer in enumerate(lm.layers):
            prefix = f"lm.layers.{i}"
            mods = {n: layer.get_submodule(n) for n in LINEARS}
            norms = [layer.get_parameter(f"{n}.weight") for n in ("input_layernorm", "post_attention_layernorm")]
            self.layers.append(LayerWeights(
                dense(norms[0]), dense(norms[1]), group(prefix, mods, LINEARS[:3]),
                linear(f"{prefix}.self_attn.o_proj", mods["self_attn.o_proj"]), group(prefix, mods, LINEARS[4:6]),
                linear(f"{prefix}.mlp.down_proj", mods["mlp.down_proj"])))

    def weight_bytes(self) -> int:
        """Bytes of the weights one forward reads: every layer's linears and norms, the final norm, the LM head
        (the embedding rows of a window are negligible)."""
        total = self.lm_head.numel() * self.lm_head.element_size() + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            for part in (layer.input_norm, layer.post_norm):
                total += part.numel() * part.element_size()
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
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
        split_kv = self._split_kv_options(b * heads, b * kv_heads, t, k_cache.shape[3])
        fused = self._split_kv and prefix is None  # the Triton path: fused norms, RoPE + cache write, SwiGLU
        if fused:
            from ..kernels.fused import restore_cache, rope_write_cache, silu_mul

            x = x.contiguous().clone()  # the residual stream is updated in place from here on
        delta: torch.Tensor | None = None  # the residual add still owed to x (the previous MLP's output)
        for i, layer in enumerate(self.layers):
            h, x = self._add_norm(x, delta, layer.input_norm, fused)
            qkv = layer.qkv(h, rows)
            kc, vc = k_cache[i], v_cache[i]
            capacity = kc.shape[2]
            if fused:
                saved = rope_write_cache(qkv, cos, sin, kc, vc, slots, heads, kv_heads, save=not write_kv)
                q = qkv[..., : heads * d].view(b, t, heads, d).transpose(1, 2)
            else:
                q, saved = self._rope_write_cache(qkv, cos, sin, kc, vc, slots, write_kv)
            q1 = q.reshape(1, b * heads, t, d)
            k1, v1 = kc.view(1, b * kv_heads, capacity, d), vc.view(1, b * kv_heads, capacity, d)
            if prefix is not None:
                out = self._split_attention(i, q1, k1, v1, prefix)
            elif fused and b == 1:  # the kernel writes (T, H, D) rows, the o projection's input, directly
                rows_out = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)
                self.attention(q1, k1, v1, start, key_end, mode, self.block_size, self.scale,
                               out=rows_out.permute(1, 0, 2)[None], **split_kv)
                out = rows_out.view(1, t, heads * d)
            else:
                out = self.attention(q1, k1, v1, start, key_end, mode, self.block_size, self.scale, **split_kv)
            if saved is not None:
                if fused:
                    restore_cache(kc, vc, slots, saved)
                else:
                    kc.index_copy_(2, slots, saved[0])
                    vc.index_copy_(2, slots, saved[1])
            if out.dim() == 4:  # (1, B * H, T, D) from the kernel's own layout
                out = out.to(x.dtype).view(b, heads, t, d).transpose(1, 2).reshape(b, t, heads * d)
            h, x = self._add_norm(x, layer.o(out, rows), layer.post_norm, fused)
            gate_up = layer.gate_up(h, rows)
            if fused:
                act = silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) * up
            delta = layer.down(act, rows)
        return self._add_norm(x, delta, self.norm, fused)[0]

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(x + delta), x + delta)`` (``delta`` ``None``: nothing to add); fused: one kernel, in place."""
        eps = self.config.rms_norm_eps
        if fused:
            from ..kernels.fused import add_rms_norm

            return add_rms_norm(x, weight, eps, delta)
        if delta is not None:
            x = x + delta
        return rms_norm(x, weight, eps), x

    def _rope_write_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                          vc: torch.Tensor, slots: torch.Tensor, write_kv: bool
                          ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The torch ops of :func:`blockpilot.kernels.fused.rope_write_cache`: q ``(B, H, T, D)`` after RoPE and the
        saved cache rows of a draft."""
        cfg = self.config
        b, t, _ = qkv.shape
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k = q.reshape(b, t, heads, d).transpose(1, 2), k.reshape(b, t, kv_heads, d).transpose(1, 2)
        v = v.reshape(b, t, kv_heads, d).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        saved = None if write_kv else (kc.index_select(2, slots), vc.index_select(2, slots))
        kc.index_copy_(2, slots, k.to(kc.dtype))
        vc.index_copy_(2, slots, v.to(vc.dtype))
        return q, saved

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

    def head(self, hidden: torch.Tensor, sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(top1, prob, sampled)`` ``(B, T)`` on the device. ``sampling``: ``(seeds (B,) int64, slots (T,) int64,
        temperature (1,) float32)``, drawn with the counter-based Gumbel keys of :mod:`blockpilot.runtime.sampling`
        (the torch backend's draw, token for token)."""
        logits = self.logits(hidden)
        if allowed is not None:  # typed value slots: (B, T, V) bool rows, masked before top-1 and sampling
            logits = logits.masked_fill(~allowed, float("-inf"))
        top1, prob = self.epilogue(logits, self.mask_id)
        if sampling is None:
            return top1, prob, None
        seeds, slots, temperature = sampling
        scores = logits.float()
        scores[..., self.mask_id] = float("-inf")
        keys = gumbel_keys(seeds, slots, scores.shape[-1])
        return top1, prob, (scores / temperature + keys).argmax(-1)
