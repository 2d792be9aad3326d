"""``blockpilot export``: a checkpoint to a verified bundle (today: the ONNX graphs with decomposed
block-diffusion attention that the ONNX Runtime backend runs, plus the model's config, tokenizer and
answer schema; TensorRT engines and quantized graphs join the same bundle layout)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.bundle import BundleWriter, load_bundle
from ..formats.onnx_io import EMBED_FILE, LM_FILE, SPEC_FILE, VISION_FILE

DEFAULT_MAX_PROMPT_TOKENS = 1024
VARIANT = "decomposed"


@dataclass(frozen=True)
class ExportSummary:
    bundle: Path
    files: dict[str, int]  # relative path -> bytes
    capacity: int
    seconds: dict[str, float]

    def table(self) -> str:
        rows = [f"bundle   {self.bundle}  (KV cache capacity {self.capacity} slots)"]
        rows += [f"  {rel:<40s} {size / 1e6:8.2f} MB" for rel, size in sorted(self.files.items())]
        rows.append("stages   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(rows)


def export_bundle(checkpoint: str | Path, out: str | Path, *, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                  with_weights: bool = False, overwrite: bool = False) -> ExportSummary:
    """Export ``checkpoint`` (fp32) into the bundle directory ``out`` and verify it by loading it back.

    The KV cache capacity is the one a planner with the scaffold decoder sizes for ``max_prompt_tokens``.
    ``with_weights`` also copies the safetensors (for the torch backend on the car).
    """
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.planner import Planner
    from .onnx_graphs import export_onnx

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    planner = Planner.from_checkpoint(Path(checkpoint), decoder=DecoderSettings(name="scaffold"),
                                      max_prompt_tokens=max_prompt_tokens)
    capacity = planner.backend.capacity
    seconds["load"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="blockpilot-export-") as tmp:
        t0 = time.perf_counter()
        spec = export_onnx(planner.backend.model, tmp, capacity)  # type: ignore[attr-defined]
        seconds["onnx"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with BundleWriter(out, overwrite=overwrite) as writer:
            writer.add_model(checkpoint, weights=with_weights)
            writer.precision_map = {}
            io: dict[str, Any] = {"spec": spec}
            if (Path(tmp) / VISION_FILE).is_file():
                writer.add_graph(Path(tmp) / VISION_FILE, role="vision", variant=VARIANT, precision="fp32", io=io)
            writer.add_graph(Path(tmp) / LM_FILE, role="lm_step", variant=VARIANT, precision="fp32", io=io,
                             extra_files=[Path(tmp) / EMBED_FILE, Path(tmp) / SPEC_FILE])
        seconds["bundle"] = time.perf_counter() - t0
    bundle = load_bundle(out)  # hashes checked once more, as the car will
    files = {rel: int(info["bytes"]) for rel, info in bundle.files.items()}
    return ExportSummary(bundle.path, files, capacity, seconds)


def graphs_dir(bundle_path: str | Path) -> Path:
    return Path(bundle_path) / "graphs" / VARIANT
