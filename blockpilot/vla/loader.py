"""Build a :class:`VLAModel` from a local Hugging Face checkpoint directory, and write one."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import atomic_write
from .checkpoint import checkpoint_files, load_weights, save_weights
from .config import ModelConfig
from .dtypes import check_dtype_name, resolve_dtype, slow_dtype_note
from .hf_config import config_to_hf, load_config
from .model import VLAModel
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    checkpoint_dir: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    token_overrides: dict[str, Any] | None = None,
) -> VLAModel:
    """Read ``config.json`` and every weight of a Qwen2 or Qwen2.5-VL checkpoint; nothing is downloaded.

    A Qwen2 (text-only) checkpoint becomes a :class:`VLAModel` without a vision tower, so the
    runtime sees one model type. ``dtype="auto"`` is the dtype the weights are stored in
    (:func:`~blockpilot.vla.dtypes.resolve_dtype`), resolved before the memory check; a dtype ``device`` cannot run
    raises :class:`~blockpilot.vla.dtypes.DtypeError`.
    """
    check_dtype_name(dtype)
    config = load_config(checkpoint_dir, token_overrides=token_overrides)
    dtype = resolve_dtype(checkpoint_dir, dtype, device)
    note = slow_dtype_note(dtype, device)
    if note:
        warnings.warn(f"loading {checkpoint_dir} in {dtype}: {note}", RuntimeWarning, stacklevel=2)
    from .memory_budget import check_fits

    check_fits(checkpoint_dir, ("load",), dtype, what=f"loading in {dtype}")  # refuse before any allocation
    with torch.device("meta"), _no_random_init():
        model = VLAModel(config)
    # Built on the meta device so a 3B model is not randomly initialised only to be overwritten, and in the target
    # dtype, so the weights are converted tensor by tensor as they are read (no full float32 copy first).
    model = model.to(dtype=DTYPES[dtype]).to_empty(device="cpu")
    model.lm.tie_weights()  # to_empty gives each parameter its own storage, untying the head
    if config.architecture == "qwen2":
        load_weights(model.lm, checkpoint_dir, "qwen2")
    else:
        load_weights(model, checkpoint_dir, config.architecture)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Skip the modules' random initialisation while a model is built on the meta device: every weight is read from
    the checkpoint next, and on the meta device ``normal_`` runs through torch's Python reference, whose first call
    imports ``torch._dynamo`` (measured: +0.15 GB resident for the rest of the process)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_tokenizer(checkpoint_dir: str | Path, config: ModelConfig) -> Tokenizer:
    """The checkpoint's ``tokenizer.json``, with special ids checked against ``config.tokens``."""
    return Tokenizer.from_file(checkpoint_dir, config.tokens)


def save_checkpoint(model: VLAModel, checkpoint_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in the HF layout of the model's architecture."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    config = model.config
    if config.architecture == "qwen2":
        save_weights(model.lm, root, "qwen2")
    else:
        save_weights(model, root, config.architecture)
    atomic_write(root / "config.json", json.dumps(config_to_hf(config), indent=2) + "\n")
    return root


def describe_checkpoint(checkpoint_dir: Path) -> str:
    """Load a checkpoint fully (every tensor validated) and summarise it for ``blockpilot inspect``."""
    model = load_model(checkpoint_dir)
    config: ModelConfig = model.config
    n_lm = sum(p.numel() for p in model.lm.parameters())
    n_vis = sum(p.numel() for p in model.visual.parameters()) if model.visual is not None else 0
    files = ", ".join(p.name for p in checkpoint_files(checkpoint_dir))
    lines = [
        f"checkpoint   {checkpoint_dir}",
        f"files        {files}",
        f"architecture {config.architecture}",
        f"parameters   LM {n_lm / 1e6:.2f} M, vision {n_vis / 1e6:.2f} M",
        f"lm           {json.dumps(config.to_dict()['lm'])}",
        f"vision       {json.dumps(config.to_dict()['vision'])}",
        f"tokens       {json.dumps(config.to_dict()['tokens'])}",
        f"diffusion    {json.dumps(config.to_dict()['diffusion'])}",
    ]
    return "\n".join(lines)
