"""Shared fixtures: tiny random checkpoints written by ``transformers`` itself, offline."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# A vocabulary small enough to be fast that still holds the block-diffusion ids the config names.
TINY_QWEN2: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "mask_token_id": 60,
    "null_token_id": 61,
    "eos_token_id": 62,
    "bd_size": 4,
    "sub_block_size": 2,
}


def pytest_configure(config: pytest.Config) -> None:
    # scripts/test.sh runs one pytest-xdist worker per core: a worker's torch keeps to one thread, as the
    # ``one_thread`` modules already do, so two workers do not spin-wait on each other's cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and norms are not all ones, so a
    dropped norm weight, a wrong head split or a mask that leaks shows up in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.2 * noise)


@pytest.fixture
def qwen2_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    """``make(name="ckpt", seed=0, save_kwargs=None, **config_overrides) -> (dir, hf_model)``:
    a random ``Qwen2ForCausalLM`` (fp32, eval mode) saved with ``save_pretrained``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def make(name: str = "ckpt", seed: int = 0, save_kwargs: dict[str, Any] | None = None,
             **overrides: Any) -> tuple[Path, Any]:
        config = Qwen2Config(**{**TINY_QWEN2, **overrides})
        model = Qwen2ForCausalLM(config).eval()
        randomize_(model, seed)
        path = tmp_path / name
        model.save_pretrained(path, **(save_kwargs or {}))
        return path, model

    return make


@pytest.fixture
def tiny_lm() -> Callable[..., Any]:
    """``make(seed=0, **lm_overrides) -> DecoderLM``: our decoder with random weights, eval mode."""
    from blockpilot.vla.config import LMConfig
    from blockpilot.vla.lm import DecoderLM

    def make(seed: int = 0, **overrides: Any) -> DecoderLM:
        fields = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2, "rope_theta": 10_000.0, "max_position": 256}
        model = DecoderLM(LMConfig(**{**fields, **overrides})).eval()
        randomize_(model, seed)
        return model

    return make


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Any]:
    """The shipped reference model and its tokenizer, loaded once per test module."""
    from blockpilot.demo import SHIPPED_MODEL
    from blockpilot.vla.loader import load_model, load_tokenizer

    model = load_model(SHIPPED_MODEL)
    return model, load_tokenizer(SHIPPED_MODEL, model.config)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for a whole test module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    The shipped and random models are tiny: more threads only spin-wait on a busy machine."""
    from runtime_fixtures import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped reference model exported with the defaults (ONNX Runtime graphs only), once per module."""
    from blockpilot.export.bundle_export import export_bundle
    from blockpilot.vla.reference_model import SHIPPED_MODEL

    out = tmp_path_factory.mktemp("shipped_bundle") / "bundle"
    export_bundle(SHIPPED_MODEL, out)
    return out
