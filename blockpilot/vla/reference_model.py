"""The reference model: a small Qwen2.5-VL-shaped block-diffusion VLA this project defines itself.

Tests, benchmarks and the default demo use it because no checkpoint can be downloaded here. Its
architecture, checkpoint layout and tokenizer files are those of a real Fast-dDrive checkpoint,
only smaller; until it is trained (``blockpilot.train``) its weights are random.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import BlockDiffusionConfig, LMConfig, ModelConfig, SpecialTokens, VisionConfig
from .loader import save_checkpoint
from .model import VLAModel
from .plans import DrivingSchema
from .reference_tokenizer import build_reference_tokenizer
from .tokenizer import Tokenizer


def reference_config(vocab_size: int, tokens: SpecialTokens) -> ModelConfig:
    lm = LMConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                  num_kv_heads=2, rope_theta=1_000_000.0, max_position=4096, tie_word_embeddings=True,
                  mrope_section=(4, 6, 6))
    # 56-pixel windows split a 112-pixel image into 2x2 windows, so windowed attention is exercised.
    vision = VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                          window_size=56, fullatt_block_indexes=(3,))
    return ModelConfig(lm=lm, vision=vision, tokens=tokens, diffusion=BlockDiffusionConfig(32, 8),
                       architecture="qwen2_5_vl")


def reference_schema() -> DrivingSchema:
    """The answer layout the reference model is trained on: nuScenes horizon, a 16-token explanation.

    The short explanation slot keeps the answer (and CPU training) small; a trained checkpoint
    records its layout in ``blockpilot.json`` (:mod:`blockpilot.vla.schema_io`).
    """
    return DrivingSchema(num_waypoints=6, rate_hz=2.0, explanation_tokens=16)


def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, ``std``) matrices and embeddings, zero biases, unit norms (the Qwen2 initialisation).

    A larger ``std`` gives random models peaked, input-dependent predictions, which decoder tests
    need; the default is what training starts from.
    """
    gen = torch.Generator().manual_seed(seed)
    init_parameters(model, lambda p: p.copy_(torch.randn(p.shape, generator=gen) * std))


def init_parameters(model: nn.Module, matrix: Callable[[torch.Tensor], object]) -> None:
    """The Qwen2 initialisation's rule, in place and without autograd: biases zero, 1-D parameters (norm weights)
    one, and every other parameter (matrices, embeddings) drawn by ``matrix``, in ``named_parameters`` order."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                matrix(p)


def build_reference_model(seed: int = 0, std: float = 0.02) -> tuple[VLAModel, Tokenizer]:
    """A randomly initialised reference model and its tokenizer (deterministic in ``seed``)."""
    tokenizer, tokens = build_reference_tokenizer()
    model = VLAModel(reference_config(tokenizer.vocab_size, tokens)).eval()
    init_weights(model, std, seed)
    return model, tokenizer


# The trained reference checkpoint shipped in the repository (models/reference, see its DATA_CARD.md): what the
# demo exports and replays, and what bench, the cuda backend's checks and many tests plan with.
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "reference"
# The SO-101 manipulation model trained on the MuJoCo arm's expert (``blockpilot train-robot``, models/robot-so101
# and its DATA_CARD.md): the reference architecture answering so101-ee action chunks.
SHIPPED_ROBOT_MODEL = SHIPPED_MODEL.parent / "robot-so101"

# The reference model sees 112x112 frames (16 image tokens); larger frames are resized down to that budget.
REFERENCE_MAX_PIXELS = 112 * 112


def write_reference_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``tokenizer.json`` and ``preprocessor_config.json`` (its
    112x112 pixel budget) of the reference model."""
    from .image_policy import ImagePolicy, write_preprocessor_config

    model, _ = build_reference_model(seed)
    root = save_checkpoint(model, out_dir)
    build_reference_tokenizer(root)
    assert model.config.vision is not None
    write_preprocessor_config(root, ImagePolicy.for_vision(model.config.vision, max_pixels=REFERENCE_MAX_PIXELS))
    return root
