"""The models the bench runs and what one forward of each reads from memory.

``reference`` is the shipped reference checkpoint (``models/reference``). ``1.5b`` and ``3b`` are random-weight
LMs of real shapes: Fast_dLLM_v2_1.5B is Qwen2.5-1.5B-Instruct (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocabulary 151936, tied embeddings), and Fast-dDrive's LM is Qwen2.5-VL-3B-Instruct's decoder
(hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008, vocabulary 151936, tied embeddings, M-RoPE
sections 16/24/24), numbers checked against those checkpoints' ``config.json``. Only the LM is built: the vision
tower is not on the block-step path. The ``transformers`` twin of each is a ``Qwen2ForCausalLM`` of the same shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..vla.config import BlockDiffusionConfig, LMConfig, ModelConfig, SpecialTokens
from ..vla.model import VLAModel
from ..vla.reference_model import init_parameters
from .shapes import BYTES, MODELS, SHAPES

__all__ = ["BYTES", "DTYPES", "MODELS", "SHAPES", "ForwardBytes", "forward_bytes", "hf_twin", "random_model"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class ForwardBytes:
    """Bytes one forward reads: weights (linears, norms, LM head) and the KV cache slots it attends to."""

    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv


def weight_bytes(lm: LMConfig, dtype: str) -> int:
    """Weights one forward reads in ``dtype``: with ``fp8`` the layers' linear weights are one byte and the rest
    (biases, norms, the LM head) bf16. The embedding rows of a window are left out (a few KB)."""
    act = BYTES["bf16" if dtype == "fp8" else dtype]
    h, d, inter = lm.hidden_size, lm.head_dim, lm.intermediate_size
    q, kv = lm.num_heads * d, lm.num_kv_heads * d
    linear = h * q + 2 * h * kv + q * h + 3 * h * inter
    biases = q + 2 * kv
    per_layer = linear * BYTES[dtype] + (biases + 2 * h) * act
    return lm.num_layers * per_layer + (h + lm.vocab_size * h) * act


def forward_bytes(lm: LMConfig, dtype: str, key_end: int) -> ForwardBytes:
    """A forward whose queries read KV slots ``[0, key_end)`` (the KV cache in the activation dtype)."""
    act = BYTES["bf16" if dtype == "fp8" else dtype]
    kv = 2 * lm.num_layers * lm.num_kv_heads * key_end * lm.head_dim * act
    return ForwardBytes(weight_bytes(lm, dtype), kv)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_model(name: str, dtype: str, device: torch.device, seed: int = 0) -> VLAModel:
    """An LM of shape ``name`` with Normal(0, 0.02) weights and unit norms, built straight on ``device`` in the
    activation dtype (no float32 copy of a 3B model is ever made)."""
    lm = SHAPES[name]
    config = ModelConfig(lm=lm, tokens=SpecialTokens(), diffusion=BlockDiffusionConfig())
    with default_dtype(DTYPES[dtype]), torch.device("meta"):
        model = VLAModel(config)
    model = model.to_empty(device=device)
    model.lm.tie_weights()
    return init_random_(model, seed)


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def init_random_(module: ModuleT, seed: int) -> ModuleT:
    """Fill an (uninitialised, ``to_empty``) module in place: Normal(0, 0.02) matrices, unit norms, zero biases;
    returns it in eval mode."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    init_parameters(module, lambda p: p.normal_(0.0, 0.02, generator=gen))
    return module.eval()


def hf_twin(lm: LMConfig, dtype: str, device: torch.device) -> Any:
    """A random ``transformers`` ``Qwen2ForCausalLM`` of the same shape (1-D RoPE: the cost is the same)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                         num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                         num_key_value_heads=lm.num_kv_heads, tie_word_embeddings=lm.tie_word_embeddings,
                         max_position_embeddings=max(lm.max_position, 4096), rms_norm_eps=lm.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta})
    with default_dtype(DTYPES[dtype]), torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.eval()
