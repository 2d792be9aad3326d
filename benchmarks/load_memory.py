"""Peak RSS of loading a random-weight checkpoint of a real shape (bf16 shards + index, the hub layout).

    PYTHONPATH=$PWD python benchmarks/load_memory.py --shape 0.5b --dir /tmp/ckpt-0.5b [--dtype float32]
    PYTHONPATH=/path/to/other/checkout python benchmarks/load_memory.py --dir /tmp/ckpt-0.5b --skip-write

The checkpoint is written once (``--skip-write`` reuses it); the load runs in a fresh subprocess so its peak RSS
(``ru_maxrss`` of the child) is the load's alone. Prints one JSON line: weight bytes in the file and in the loaded
dtype, seconds, peak RSS and its ratio to the loaded weight bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # Qwen2.5 decoders (config.json of the published checkpoints), tied embeddings
    "0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24,
             "num_heads": 14, "num_kv_heads": 2},
    "1.5b": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28,
             "num_heads": 12, "num_kv_heads": 2},
}
SHARD_BYTES = 2 << 30


def write_checkpoint(shape: str, out: Path, seed: int = 0) -> None:
    """A text-only random checkpoint in bf16 shards with ``model.safetensors.index.json`` (built on the meta device
    and filled in bf16: no float32 copy)."""
    import torch
    from safetensors.torch import save_file

    from blockpilot.bench.models import default_dtype, init_random_
    from blockpilot.vla.checkpoint import SAVE_RULES, renamer
    from blockpilot.vla.config import BlockDiffusionConfig, LMConfig, ModelConfig, SpecialTokens
    from blockpilot.vla.hf_config import config_to_hf
    from blockpilot.vla.model import VLAModel

    lm = LMConfig(**SHAPES[shape], rope_theta=1_000_000.0, tie_word_embeddings=True)  # type: ignore[arg-type]
    config = ModelConfig(lm=lm, tokens=SpecialTokens(), diffusion=BlockDiffusionConfig())
    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = VLAModel(config)
    model = model.to_empty(device="cpu")
    model.lm.tie_weights()
    init_random_(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    rename = renamer(SAVE_RULES["qwen2"])
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in model.lm.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][str(rename(name))] = tensor.contiguous()
        size += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps({**config_to_hf(config), "torch_dtype": "bfloat16"}, indent=2))


CHILD = """
import json, resource, sys, time
from blockpilot.vla.loader import load_model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # python + torch, before any weight
t = time.perf_counter()
model = load_model(sys.argv[1], dtype=sys.argv[2])
seconds = time.perf_counter() - t
loaded = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": round(seconds, 2), "loaded_bytes": loaded, "import_rss_bytes": base,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--skip-write", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_write:
        t = time.perf_counter()
        write_checkpoint(args.shape, args.dir)
        print(f"wrote {args.dir} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    file_bytes = sum(p.stat().st_size for p in args.dir.glob("*.safetensors"))
    # cwd "/": a `-c` child puts its cwd first on sys.path, which would shadow the PYTHONPATH checkout
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.dir.absolute()), args.dtype], check=True,
                         capture_output=True, text=True, cwd="/")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(shape=args.shape, dtype=args.dtype, file_bytes=file_bytes,
                  rss_over_loaded=round(result["peak_rss_bytes"] / result["loaded_bytes"], 2),
                  load_rss_over_loaded=round((result["peak_rss_bytes"] - result["import_rss_bytes"])
                                             / result["loaded_bytes"], 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
