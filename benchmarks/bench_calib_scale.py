"""Per-sample calibration cost at a published LM shape, teacher-forced against the decode path.

Builds a random-weight text-only model of a Qwen2.5 shape (``0.5b``: hidden 896, 24 layers, 14/2 heads,
MLP 4864, vocabulary 151,936, tied embeddings; ``1.5b``: hidden 1536, 28 layers, 12/2 heads, MLP 8960)
in float32 with the reference tokenizer's special tokens, inserts the fp8 recipe's quantizers with
modelopt and times the calibration loop per sample in each mode (random weights: the decode path runs
its worst case, every draft rejected). Prints per-sample seconds, forwards and tokens, and the
extrapolation of a 16-sample fp8 quantize to the 1.5B shape by the ratio of non-embedding parameters.

    .venv/bin/python benchmarks/bench_calib_scale.py [--shape 0.5b] [--teacher 4] [--decode 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockpilot.calibration import synthetic_calibration_source  # noqa: E402
from blockpilot.quant.pipeline import quantize_planner  # noqa: E402
from blockpilot.quant.recipes import resolve_recipe  # noqa: E402
from blockpilot.runtime.planner import Planner  # noqa: E402
from blockpilot.vla.config import LMConfig, ModelConfig  # noqa: E402
from blockpilot.vla.model import VLAModel  # noqa: E402
from blockpilot.vla.reference_model import init_weights, reference_config  # noqa: E402
from blockpilot.vla.reference_tokenizer import build_reference_tokenizer  # noqa: E402

SHAPES = {  # Qwen2.5 published dimensions (Fast_dLLM_v2 1.5B is Qwen2.5-1.5B-Instruct's)
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2},
}
VOCAB = 151_936


def build(shape: str) -> tuple[ModelConfig, object]:
    tokenizer, tokens = build_reference_tokenizer()
    base = reference_config(tokenizer.vocab_size, tokens)
    lm = LMConfig(vocab_size=VOCAB, rope_theta=1_000_000.0, max_position=32768, tie_word_embeddings=True,
                  **SHAPES[shape])
    return dataclasses.replace(base, lm=lm, vision=None, architecture="qwen2"), tokenizer


def non_embedding_params(config: ModelConfig) -> int:
    lm = config.lm
    head = lm.hidden_size // lm.num_heads
    heads = lm.num_heads + lm.num_kv_heads
    attn = 2 * lm.hidden_size * head * heads + head * (lm.num_heads + 2 * lm.num_kv_heads)
    return lm.num_layers * (attn + 3 * lm.hidden_size * lm.intermediate_size + 2 * lm.hidden_size)


def measure(config: ModelConfig, tokenizer: object, mode: str, samples: int, cache: Path) -> dict[str, object]:
    model = VLAModel(config).eval()
    init_weights(model, 0.02, 0)
    planner = Planner.from_model(model, tokenizer, max_prompt_tokens=256)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    _, _, manifest, _ = quantize_planner(planner, resolve_recipe("fp8"), synthetic_calibration_source(2), samples,
                                         cache_dir=cache, calib_mode=mode)
    loop = manifest["loop"]
    total = time.perf_counter() - t0
    del planner, model
    per = (loop["seconds"] + loop.get("answer_seconds", 0.0)) / samples
    return {"mode": mode, "samples": samples, "quantize_seconds": total, "loop": loop, "seconds_per_sample": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    parser.add_argument("--teacher", type=int, default=4, help="samples calibrated teacher-forced")
    parser.add_argument("--decode", type=int, default=1, help="samples calibrated on the decode path (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, tokenizer = build(args.shape)
    cache = Path(tempfile.mkdtemp(prefix="bench_calib_scale_"))
    rows = [measure(config, tokenizer, "teacher", args.teacher, cache)]
    if args.decode:
        rows.append(measure(config, tokenizer, "decode", args.decode, cache))
    ratio = non_embedding_params(build("1.5b")[0]) / non_embedding_params(config)
    for r in rows:
        r["estimate_1p5b_16_samples_min"] = float(r["seconds_per_sample"]) * ratio * 16 / 60  # type: ignore[arg-type]
        print(json.dumps(r), flush=True)
    print(f"shape {args.shape}: {non_embedding_params(config) / 1e6:.0f} M non-embedding parameters; 1.5B has "
          f"{ratio:.2f}x; {args.threads} threads")
    for r in rows:
        loop = r["loop"]
        assert isinstance(loop, dict)
        print(f"{r['mode']:8s} {r['seconds_per_sample']:.1f} s/sample ({loop['forwards'] / r['samples']:.0f} forwards, "  # type: ignore[operator]
              f"{loop.get('packed_tokens', loop.get('prompt_tokens', 0) + loop.get('answer_tokens', 0))} tokens); "
              f"16 samples at 1.5B ~ {r['estimate_1p5b_16_samples_min']:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ratio_1p5b": ratio, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
