"""Qwen2-architecture decoder with block-diffusion attention modes and a static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .kv_cache import KVCache
from .masks import attention_mask
from .modes import AttentionMode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """1-D RoPE, or Qwen2.5-VL's multimodal RoPE when ``mrope_section`` is set.

    With M-RoPE the rotary channel pairs are split into (time, height, width) sections and each
    section rotates by its own position axis; text tokens carry the same value on all three.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.mrope_section = config.mrope_section

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # Made per call in float32 rather than kept as a buffer, which a bf16 cast of the model
        # would round (and which meta-device construction would leave empty).
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids``: (B, T), or (3, B, T) for M-RoPE. Returns cos, sin of shape (B, T, head_dim)."""
        inv_freq = self.inv_freq(position_ids.device)
        if self.mrope_section is None:
            if position_ids.dim() != 2:
                raise ValueError(f"position_ids must be (batch, tokens), got shape {tuple(position_ids.shape)}")
            freqs = position_ids[..., None].float() * inv_freq
        else:
            if position_ids.dim() == 2:
                position_ids = position_ids[None].expand(3, -1, -1)
            if position_ids.dim() != 3 or position_ids.shape[0] != 3:
                raise ValueError(f"M-RoPE position_ids must be (3, batch, tokens), got {tuple(position_ids.shape)}")
            per_axis = position_ids[..., None].float() * inv_freq  # (3, B, T, D/2)
            chunks = per_axis.split(list(self.mrope_section), dim=-1)
            freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None,
        start: int,
        write_kv: bool,
        kv_end: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if write_kv:
                cache.write(self.layer, start, k, v)
                k, v = cache.view(self.layer, kv_end)
            elif start > 0:
                k_prev, v_prev = cache.view(self.layer, start)
                k, v = torch.cat((k_prev, k), dim=2), torch.cat((v_prev, v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, start: int, write_kv: bool, kv_end: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, write_kv, kv_end)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """Token embeddings, decoder layers, final norm and LM head.

    One forward processes a window of ``T`` new tokens whose K/V belong at cache slots
    ``start .. start+T-1``; it attends to cached slots ``0 .. start-1`` plus the window, under the
    given :class:`AttentionMode`. With ``write_kv=False`` the window's K/V are used but not stored
    (a block-diffusion denoising step); without a cache, ``start`` only offsets positions.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embeddings when the config says so (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, capacity, batch, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        mode: AttentionMode = AttentionMode.CAUSAL,
        block_size: int | None = None,
        write_kv: bool = True,
        kv_end: int | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the final normed hidden states ``(B, T, hidden)``; see :meth:`logits`.

        ``kv_end`` (with ``write_kv``) widens the keys to cache slots ``0 .. kv_end-1`` even past the
        window: Fast-dLLM v2's sub-block cache lets the active sub-block see the rest of its block
        as cached when the block was last run whole.

        ``attn_mask`` (boolean, ``(T, keys)`` or ``(B, T, keys)``, True = may attend) replaces the
        mode's mask, for layouts no mode describes: block-diffusion training packs a noisy copy of
        the answer beside the clean one.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        device = x.device
        q_slots = torch.arange(start, start + t, device=device)
        end = start + t
        if kv_end is not None:
            if cache is None or not write_kv or kv_end < end:
                raise ValueError(f"kv_end={kv_end} needs a cache, write_kv=True and kv_end >= start + tokens ({end})")
            end = kv_end
        if cache is not None:
            cache.check_room(start, end - start if write_kv else 0)
            if cache.batch != b:
                raise ValueError(f"KV cache holds batch {cache.batch}, input has batch {b}")
            k_slots = torch.arange(0, end, device=device)
        else:
            k_slots = q_slots
        if position_ids is None:
            position_ids = q_slots[None].expand(b, -1)
        if attn_mask is None:
            mask = attention_mask(q_slots, k_slots, AttentionMode(mode), block_size)
        else:
            mask = _checked_mask(attn_mask, b, t, k_slots.shape[0])
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start, write_kv, end)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _checked_mask(mask: torch.Tensor, batch: int, queries: int, keys: int) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be boolean (True = may attend), got {mask.dtype}")
    if mask.shape not in ((queries, keys), (batch, queries, keys)):
        raise ValueError(f"attn_mask must have shape ({queries}, {keys}) or ({batch}, {queries}, {keys}), "
                         f"got {tuple(mask.shape)}")
    return mask if mask.dim() == 2 else mask[:, None]
