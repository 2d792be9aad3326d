"""KV-cache bytes moved per LM step, whole-cache I/O (before) vs window I/O (after), at 1k, 4k and 8k slots.

The reference model is exported both ways at each cache size and one block step (a 32-token window after a
200-token prompt: a draft, then its commit) runs on ONNX Runtime; the KV bytes the graph hands back are read
from the arrays it returned, checked against :func:`blockpilot.runtime.kv_window.step_traffic`, and the step is
timed. The published shapes (Fast_dLLM_v2 1.5B and 7B, Qwen2.5-VL-3B for Fast-dVLM / Fast-dDrive) are counted
from their graph I/O shapes alone (fp32 cache, as the ONNX Runtime graph holds it).

TensorRT fp16 engines keep the cache in fp16 (the LM graph's cache I/O is rewritten to float16,
``to_fp16_graph(fp16_io=KV_CACHE_IO)``): the "TRT fp16" columns count the same window I/O at 2 bytes per element,
and the resident cache (K and V, every slot) at 4 and 2 bytes. For the reference model the element size is read
from the network TensorRT(-RTX) parses from the rewritten graph (past_k / past_v / k_new / v_new must be HALF).

    PYTHONPATH=$PWD python benchmarks/bench_kv_io.py [--slots 1024 4096 8192] [--reps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from blockpilot.runtime.kv_window import StepTraffic, slot_bytes, step_traffic
from blockpilot.vla.modes import AttentionMode

MODEL = Path(__file__).resolve().parents[1] / "models" / "reference"
PROMPT, WINDOW = 200, 32
# (layers, kv_heads, head_dim) of the published checkpoints' language models.
PUBLISHED = {"1.5b (Fast_dLLM_v2_1.5B)": (28, 2, 128), "3b (Qwen2.5-VL-3B: Fast-dVLM / Fast-dDrive)": (36, 2, 128),
             "7b (Fast_dLLM_v2_7B)": (28, 4, 128)}


def measure(onnx_dir: Path, reps: int) -> dict[str, Any]:
    """One draft + commit of a WINDOW-token block after a PROMPT-token prefill on ONNX Runtime: the KV bytes the
    graph returned per step and the median step time."""
    from blockpilot.runtime.backend import Prompt
    from blockpilot.runtime.ort_backend import OrtBackend

    backend = OrtBackend(onnx_dir)
    rng = np.random.default_rng(0)
    backend.prefill(Prompt(rng.integers(10, 200, PROMPT)))
    block = rng.integers(10, 200, (1, WINDOW))
    times, returned = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.step(block, PROMPT, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
        backend.step(block, PROMPT, mode=AttentionMode.CAUSAL, write_kv=True)
        times.append((time.perf_counter() - t0) / 2)
        backend.truncate(PROMPT)
        returned = sum(v.nbytes for k, v in backend.last_outputs.items() if k not in ("top1", "prob"))
    return {"kv_io": backend.kv_io, "kv_bytes_returned": returned, "step_ms": 1e3 * float(np.median(times))}


def traffic(io: str, dims: tuple[int, int, int], capacity: int, key_end: int, itemsize: int = 4) -> StepTraffic:
    layers, heads, dim = dims
    return step_traffic(io, layers=layers, kv_heads=heads, head_dim=dim, capacity=capacity, t=WINDOW,
                        key_end=key_end, itemsize=itemsize)


def engine_cache_itemsize(onnx_dir: Path) -> int | None:
    """Bytes per cache element of the fp16 engine's network parsed from ``onnx_dir``'s LM step rewritten as the
    export rewrites it (None without TensorRT). Raises when the cache tensors are not all one 16-bit type."""
    from blockpilot.export.fp16_graph import KV_CACHE_IO, to_fp16_graph
    from blockpilot.export.trt_build import TrtUnavailableError, load_tensorrt, parse_network

    try:
        trt = load_tensorrt()
    except TrtUnavailableError:
        return None
    half = onnx_dir / "lm_step.fp16.onnx"
    to_fp16_graph(onnx_dir / "lm_step.onnx", half, fp16_io=KV_CACHE_IO)
    _, network = parse_network(trt, trt.Logger(trt.Logger.ERROR), half)
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    kinds = {str(t.dtype).rsplit(".", 1)[-1] for t in tensors if t.name in KV_CACHE_IO}
    if kinds != {"HALF"}:
        raise SystemExit(f"{half}: the fp16 engine's cache tensors are {kinds}, not HALF")
    return 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slots", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from blockpilot.export import export_onnx
    from blockpilot.vla.loader import load_model

    model = load_model(MODEL)
    lm = model.config.lm
    ref = (lm.num_layers, lm.num_kv_heads, lm.head_dim)
    rows: list[dict[str, Any]] = []
    print(f"one block step: a {WINDOW}-token window after a {PROMPT}-token prompt (key_end {PROMPT + WINDOW}); "
          "KV bytes per step, K and V, fp32 (TRT fp16: the TensorRT fp16 engine's fp16 cache)")
    print(f"{'shape':44} {'slots':>6} {'before MB':>10} {'after MB':>9} {'ratio':>7} {'TRT fp16':>9} "
          f"{'cache MB fp32/fp16':>18} {'ORT out before/after':>22} {'step ms before/after':>21}")
    with tempfile.TemporaryDirectory() as tmp:
        for slots in args.slots:
            row: dict[str, Any] = {"shape": "reference (1.23M)", "dims": ref, "slots": slots}
            for io in ("full", "window"):
                out = Path(tmp) / f"{io}_{slots}"
                export_onnx(model, out, slots, kv_io=io)
                got = measure(out, args.reps)
                want = traffic(io, ref, slots, PROMPT + WINDOW).written
                if got["kv_bytes_returned"] != want:
                    raise SystemExit(f"{io} at {slots} slots: the graph returned {got['kv_bytes_returned']} KV bytes, "
                                     f"the count says {want}")
                row[io] = {**got, **traffic(io, ref, slots, PROMPT + WINDOW).__dict__}
                if io == "window":
                    row["trt_fp16_itemsize_checked"] = engine_cache_itemsize(out)
            rows.append(row)
    for name, dims in PUBLISHED.items():
        for slots in args.slots:
            rows.append({"shape": name, "dims": dims, "slots": slots,
                         **{io: traffic(io, dims, slots, PROMPT + WINDOW).__dict__ for io in ("full", "window")}})
    for row in rows:
        fields = ("io", "copied_in", "read", "written", "committed")
        before, after = (StepTraffic(**{k: row[io][k] for k in fields}) for io in ("full", "window"))
        row["ratio"] = before.moved / after.moved
        worst = traffic("window", row["dims"], row["slots"], row["slots"])  # every slot visible
        row["window_all_visible_moved"] = worst.moved
        row["trt_fp16"] = traffic("window", row["dims"], row["slots"], PROMPT + WINDOW, itemsize=2).__dict__
        row["cache_bytes"] = {"fp32": row["slots"] * slot_bytes(*row["dims"], 4),
                              "fp16": row["slots"] * slot_bytes(*row["dims"], 2)}
        trt16 = StepTraffic(**row["trt_fp16"]).moved
        measured = ""
        if "step_ms" in row["full"]:
            full, win = row["full"], row["window"]
            measured = (f"{full['kv_bytes_returned'] / 1e6:9.2f}/{win['kv_bytes_returned'] / 1e6:<9.3f}MB"
                        f" {full['step_ms']:9.2f}/{win['step_ms']:<9.2f}")
        cache = row["cache_bytes"]
        print(f"{row['shape']:44} {row['slots']:6d} {before.moved / 1e6:10.1f} {after.moved / 1e6:9.2f} "
              f"{row['ratio']:6.1f}x {trt16 / 1e6:9.2f} {cache['fp32'] / 1e6:8.1f}/{cache['fp16'] / 1e6:<8.1f} "
              f"{measured}")
    print("before: the whole cache read and the whole present written; after: the visible rows read, the window's "
          "rows written out and committed (bytes per slot: " +
          ", ".join(f"{n.split()[0]} {slot_bytes(*d, 4)}" for n, d in [("reference", ref), *PUBLISHED.items()]) +
          " in fp32; half that in the TensorRT fp16 engine's cache)")
    checked = {r["trt_fp16_itemsize_checked"] for r in rows if "trt_fp16_itemsize_checked" in r}
    print("TRT fp16: the window I/O at 2 bytes per element; the reference engine's network parsed from the rewritten "
          "graph: " + ("past_k / past_v / k_new / v_new HALF" if checked == {2} else "not checked (no TensorRT)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
