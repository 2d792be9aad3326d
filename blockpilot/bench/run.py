"""``blockpilot bench``: block-step forwards against the memory roofline, AR decode against ``transformers``, and
plans per decoder, all measured in one run on one machine.

Per model and dtype: the p50 ms of one block step (``block_tokens`` tokens, a bidirectional draft, over a
``kv_tokens``-slot KV cache) and of one AR step (one token, causal, written), each beside its roofline: the bytes
the forward must read (weights, and the KV slots it attends to) over the memory bandwidth measured at the start
of the same run; the ratio is measured / roofline (1.0 = at the roofline). ``transformers`` ``generate`` (greedy,
batch 1, the same prompt length) runs on a ``Qwen2ForCausalLM`` of the same shape; its ms per token is the time of
``1 + new_tokens`` tokens minus that of 1, over ``new_tokens``. Then the reference model (``checkpoint``) plans
through the Planner with each decoder and backend (p50 ms per plan, forwards, tokens per forward), on the
observation its answer schema calls for (:mod:`.observations`: a driving keyframe, or a robot model's prompt of
camera frames, state and instruction).

On a GPU the backends are ``torch`` (eager, on CUDA) and ``cuda`` (static cache, CUDA graphs, Triton); on a CPU
``torch`` and, for plans, ``onnxruntime``, each at every ``threads`` count. The 1.5B / 3B shapes are skipped on a
CPU unless ``allow_slow``; FP8 needs a GPU of compute capability 8.9+. Skipped rows say why.
"""

from __future__ import annotations

import statistics
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.backend import Backend, Prompt
from ..vla.config import LMConfig
from ..vla.model import VLAModel
from ..vla.modes import AttentionMode
from ..vla.reference_model import SHIPPED_MODEL
from .estimate import VISION_SHAPES, plan_estimates, vision_ms
from .measure import Bandwidth, device_name, measure_bandwidth, p50_ms
from .models import DTYPES, MODELS, forward_bytes, hf_twin, random_model
from .plan_rows import plan_row
from .shapes import BenchError

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    models: tuple[str, ...] = MODELS
    dtypes: tuple[str, ...] | None = None  # None: fp32, bf16 on a CPU; bf16, fp8 on a GPU
    device: str = "auto"
    allow_slow: bool = False
    repeats: int = 10
    plan_repeats: int = 5
    threads: tuple[int, ...] = (1, 2)
    kv_tokens: int = 1024
    block_tokens: int = 32
    decoders: tuple[str, ...] = ("ar", "block", "scaffold")
    hf: bool = True
    hf_new_tokens: int = 16
    onnxruntime: bool = True
    bandwidth_mib: int | None = None  # None: 1024 on a GPU, 256 on a CPU
    checkpoint: Path = SHIPPED_MODEL
    cpu_target_ms: float = 200.0
    fp8_per_channel: bool = False  # fp8 weight scales: per tensor (modelopt's FP8 default), or per output channel
    image: tuple[int, int] = (504, 896)  # (height, width) of the camera image of the plan estimates
    cameras: int | None = None  # frames in a robot checkpoint's plan prompt (None: 1); refused for driving
    bundle: Path | None = None  # plans only, of this exported bundle on ONNX Runtime (no models, steps or AR)
    trusted_keys: tuple[str, ...] = ()  # with bundle: it must be signed by one of these

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        bad = [d for d in (self.dtypes or ()) if d not in DTYPES]
        if unknown or bad:
            raise BenchError(f"unknown models {unknown} (choose from {MODELS}) or dtypes {bad} "
                             f"(choose from {tuple(DTYPES)})")
        if self.repeats < 1 or self.plan_repeats < 1 or self.kv_tokens < 1 or self.block_tokens < 1:
            raise BenchError("repeats, plan_repeats, kv_tokens and block_tokens must be positive")


@dataclass
class Report:
    device: dict[str, Any]
    bandwidth: dict[str, Any]
    settings: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    ar: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    vision: list[dict[str, Any]] = field(default_factory=list)
    estimates: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "model dtype: error" of a measurement that raised

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _threads(device: torch.device, n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if device.type == "cpu" and n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _backend(name: str, model: VLAModel, capacity: int, dtype: str, fp8_per_channel: bool = False) -> Backend:
    if name == "cuda":
        from ..runtime.cuda_backend import CudaBackend

        return CudaBackend(model, capacity, precision=dtype, fp8_per_channel=fp8_per_channel)
    from ..runtime.torch_backend import TorchBackend

    return TorchBackend(model, capacity)


def _prompt_ids(model: VLAModel, n: int, seed: int = 0) -> np.ndarray:
    tokens = model.config.tokens
    specials = [t for t in (tokens.mask, tokens.null, tokens.end, tokens.image, tokens.vision_start,
                            tokens.vision_end, tokens.pad) if t is not None]
    ids = np.random.default_rng(seed).integers(16, model.config.lm.vocab_size - 16, n)
    ids[np.isin(ids, specials)] = 16
    return ids.astype(np.int64)


def _roofline(ms: float, lm: LMConfig, dtype: str, key_end: int, bandwidth: Bandwidth) -> dict[str, Any]:
    need = forward_bytes(lm, dtype, key_end)
    roofline = need.total / bandwidth.bytes_per_s * 1e3
    return {"weight_bytes": need.weights, "kv_bytes": need.kv, "bytes": need.total, "roofline_ms": roofline,
            "ratio": ms / roofline}


def _step_rows(report: Report, opts: BenchOptions, name: str, model: VLAModel, dtype: str, backend: str,
               threads: int | None, device: torch.device, bandwidth: Bandwidth) -> float:
    """One block-step row and the AR step time (returned) for one backend."""
    kv, block = opts.kv_tokens, opts.block_tokens
    lm = model.config.lm
    with _threads(device, threads):
        runner = _backend(backend, model, kv + block + 64, dtype, opts.fp8_per_channel)
        ids = _prompt_ids(model, kv + block)
        prompt = Prompt(ids[:kv])
        runner.prefill(prompt)
        window = ids[None, kv:]

        def prefill() -> None:
            runner.truncate(0)
            runner.prefill(prompt)

        def ar_step() -> None:
            runner.step(window[:, :1], kv, mode=AttentionMode.CAUSAL, write_kv=True)
            runner.truncate(kv)

        step_ms = p50_ms(lambda: runner.step(window, kv, mode=AttentionMode.BIDIRECTIONAL, write_kv=False), device,
                         opts.repeats, warmup=2)
        ar_ms = p50_ms(ar_step, device, opts.repeats, warmup=2)
        prefill_ms = p50_ms(prefill, device, max(1, opts.repeats // 2), warmup=1)
    row = {"model": name, "dtype": dtype, "backend": backend, "threads": threads, "tokens": block, "kv_tokens": kv,
           "step_ms": step_ms, **_roofline(step_ms, lm, dtype, kv + block, bandwidth),
           "prefill_ms": prefill_ms, "ar_ms": ar_ms,
           "ar_roofline_ms": _roofline(ar_ms, lm, dtype, kv + 1, bandwidth)["roofline_ms"]}
    row["ar_ratio"] = ar_ms / row["ar_roofline_ms"]
    report.steps.append(row)
    return ar_ms


def _hf_ms_per_token(lm: LMConfig, dtype: str, device: torch.device, ids: np.ndarray, new_tokens: int,
                     repeats: int) -> float | None:
    """Median over ``repeats`` back-to-back pairs of (generate ``1 + new_tokens``) - (generate 1), per new token;
    ``None`` when noise swamps it (a non-positive difference)."""
    model = hf_twin(lm, dtype, device)
    prompt = torch.from_numpy(ids)[None].to(device)
    mask = torch.ones_like(prompt)

    def generate(n: int) -> Callable[[], object]:
        return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, num_beams=1, pad_token_id=0)

    one, many = generate(1), generate(1 + new_tokens)
    one(), many()  # warm-up
    diffs = [(p50_ms(many, device, 1, warmup=0) - p50_ms(one, device, 1, warmup=0)) / new_tokens
             for _ in range(max(3, repeats))]
    ms = statistics.median(diffs)
    return ms if ms > 0 else None


def _model_for(name: str, dtype: str, device: torch.device, checkpoint: Path) -> VLAModel:
    if name == "reference":
        from ..vla.loader import load_model

        return load_model(checkpoint, dtype="float32" if dtype == "fp32" else
                          {"bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}[dtype], device=str(device))
    return random_model(name, dtype, device)


def _skip_reason(opts: BenchOptions, name: str, dtype: str, device: torch.device) -> str | None:
    if device.type == "cpu" and name != "reference" and not opts.allow_slow:
        return f"{name} {dtype}: skipped on the CPU (minutes per forward); pass --allow-slow to run it"
    if dtype == "fp8" and device.type == "cpu":
        return f"{name} fp8: FP8 matmuls need a CUDA GPU of compute capability 8.9+"
    if dtype == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"{name} fp8: {device_name(device)} has compute capability {torch.cuda.get_device_capability(device)}"
    return None


def _bound(fn: Callable[[Any], object], arg: Any) -> Callable[[], object]:
    return lambda: fn(arg)


def _plans(report: Report, opts: BenchOptions, dtype: str, device: torch.device, model: VLAModel, log: Log) -> None:
    """Plans of the reference model per backend and decoder (ONNX Runtime: the fp32 export, on a CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        _plans_in(report, opts, dtype, device, model, log, Path(tmp))


def _plans_in(report: Report, opts: BenchOptions, dtype: str, device: torch.device, model: VLAModel, log: Log,
              tmp: Path) -> None:
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.planner import DEFAULT_MAX_PROMPT_TOKENS, Planner, cache_capacity
    from ..vla.image_policy import load_image_policy
    from ..vla.loader import load_tokenizer
    from ..vla.scaffold import Scaffold, build_scaffold
    from ..vla.schema_io import load_schema
    from .observations import bench_observation

    tokenizer = load_tokenizer(opts.checkpoint, model.config)
    schema = load_schema(opts.checkpoint)
    vision = model.config.vision
    policy = None if vision is None else load_image_policy(opts.checkpoint, vision)
    obs, described = bench_observation(opts.checkpoint, schema, policy, opts.cameras)
    report.settings["plan_observation"] = described
    scaffold: Scaffold[Any] = build_scaffold(schema, tokenizer)
    answer = len(scaffold)
    resolved = DecoderSettings().filled(model.config.diffusion, answer)  # every decoder's budget: the scaffold's
    assert resolved.max_new_tokens is not None and resolved.block_size is not None
    capacity = cache_capacity(DEFAULT_MAX_PROMPT_TOKENS, resolved.max_new_tokens, resolved.block_size)
    runs: list[tuple[str, int | None]]
    if device.type == "cuda":
        runs = [("cuda", None)] if dtype == "fp8" else [("torch", None), ("cuda", None)]
    else:
        runs = [("torch", t) for t in opts.threads]
        if opts.onnxruntime and dtype == "fp32":
            from ..export.onnx_graphs import export_onnx

            export_onnx(model, tmp, capacity)  # the same cache size as the torch planners'
            runs += [("onnxruntime", t) for t in opts.threads]
    for backend, threads in runs:
        for decoder in opts.decoders:
            settings = DecoderSettings(name=decoder)
            with _threads(device, threads):
                if backend == "onnxruntime":
                    from ..runtime.ort_backend import ort_planner

                    planner = ort_planner(opts.checkpoint, tmp, decoder=settings, threads=threads or 1)
                else:
                    runner = _backend(backend, model, capacity, dtype, opts.fp8_per_channel)
                    planner = Planner(runner, model.config, tokenizer, decoder=settings, schema=schema)
                plan = planner.plan(obs)  # the warm-up; counts are deterministic
                ms = p50_ms(_bound(planner.plan, obs), device, opts.plan_repeats, warmup=0)
            report.plans.append(plan_row("reference", dtype, backend, threads, decoder, described, ms, plan,
                                         opts.cpu_target_ms if device.type == "cpu" else None))
            log(f"  plan {backend:<11} {dtype:<5} threads={threads} {decoder:<9} {ms:9.1f} ms")


def run_bench(opts: BenchOptions, log: Log = print, progress: Callable[[Report], object] | None = None) -> Report:
    """Run every measurement ``opts`` asks for; returns the report (see :func:`write_report`). ``progress`` gets
    the report so far after each model and dtype (a run cut short still leaves its rows)."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if opts.device == "auto" else opts.device)
    except RuntimeError as exc:
        raise BenchError(f"--device {opts.device!r}: {exc}") from None
    if device.type not in ("cuda", "cpu"):
        raise BenchError(f"--device must be auto, cuda or cpu, got {opts.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but this torch build sees no CUDA device")
    if "reference" in opts.models and opts.decoders and opts.bundle is None:  # refused before any measurement
        from ..vla.schema_io import load_schema
        from .observations import check_plan_observation

        check_plan_observation(opts.checkpoint, load_schema(opts.checkpoint), opts.cameras)
    on_cuda = device.type == "cuda"
    dtypes = opts.dtypes or (("bf16", "fp8") if on_cuda else ("fp32", "bf16"))
    with _threads(device, max(opts.threads)):
        bandwidth = measure_bandwidth(device, opts.bandwidth_mib or (1024 if on_cuda else 256))
    report = Report(
        device={"type": device.type, "name": device_name(device), "torch": torch.__version__,
                "cpu_threads": list(opts.threads) if not on_cuda else None},
        bandwidth=bandwidth.to_dict(),
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()} | {"dtypes": dtypes})
    log(f"blockpilot bench on {report.device['name']}: memory bandwidth {bandwidth.bytes_per_s / 1e9:.1f} GB/s "
        f"({bandwidth.method})")
    if opts.bundle is not None:
        from .plan_rows import bundle_plans

        report.plans, report.settings["plan_observation"] = bundle_plans(
            opts.bundle, threads=opts.threads, decoders=opts.decoders, cameras=opts.cameras,
            repeats=opts.plan_repeats, cpu_target_ms=opts.cpu_target_ms, trusted_keys=opts.trusted_keys, log=log)
        return report
    for name in opts.models:
        for dtype in dtypes:
            reason = _skip_reason(opts, name, dtype, device)
            if reason is not None:
                report.skipped.append(reason)
                log(f"  skip {reason}")
                continue
            try:
                _bench_model(report, opts, name, dtype, device, bandwidth, log)
            except Exception as exc:  # one broken shape must not lose the rows measured so far
                report.failed.append(f"{name} {dtype}: {type(exc).__name__}: {exc}")
                log(f"  FAILED {name} {dtype}:\n{traceback.format_exc()}")
            if progress is not None:
                progress(report)
            if on_cuda:
                torch.cuda.empty_cache()
    vision = {(v["model"], v["dtype"]): v for v in report.vision}
    hf = {r["model"]: r["ms_per_token"] for r in report.ar if r["impl"] == "transformers generate"
          and r["dtype"] in ("bf16", "fp16", "fp32")}
    report.estimates = plan_estimates(report.steps, report.plans, vision, hf)
    return report


def _bench_model(report: Report, opts: BenchOptions, name: str, dtype: str, device: torch.device,
                 bandwidth: Bandwidth, log: Log) -> None:
    """Step rows per backend, transformers beside our AR, and (reference model) plans, for one model and dtype."""
    on_cuda = device.type == "cuda"
    backends = ("torch", "cuda") if on_cuda else ("torch",)
    threads = opts.threads if not on_cuda else (None,)
    model = _model_for(name, dtype, device, opts.checkpoint)
    ours: list[tuple[str, int | None, float]] = []
    for backend in backends:
        if dtype == "fp8" and backend != "cuda":
            continue
        for t in threads:
            ms = _step_rows(report, opts, name, model, dtype, backend, t, device, bandwidth)
            ours.append((backend, t, ms))
            log(f"  step {name:<9} {dtype:<5} {backend:<6} threads={t} "
                f"{report.steps[-1]['step_ms']:8.2f} ms (ratio {report.steps[-1]['ratio']:.2f})")
    hf: dict[int | None, float | None] = {}
    if opts.hf and dtype != "fp8":
        ids = _prompt_ids(model, opts.kv_tokens)
        for t in threads:
            with _threads(device, t):
                hf[t] = _hf_ms_per_token(model.config.lm, dtype, device, ids, opts.hf_new_tokens,
                                         opts.repeats)
            report.ar.append({"model": name, "dtype": dtype, "impl": "transformers generate", "threads": t,
                              "ms_per_token": hf[t], "speedup_vs_transformers": None})
    for backend, t, ms in ours:
        base = hf.get(t)
        report.ar.append({"model": name, "dtype": dtype, "impl": f"blockpilot {backend}", "threads": t,
                          "ms_per_token": ms, "speedup_vs_transformers": None if base is None else base / ms})
    if name == "reference" and opts.decoders:
        _plans(report, opts, dtype, device, model, log)
    if name in VISION_SHAPES:
        del model
        report.vision.append({"model": name, "dtype": dtype,
                              **vision_ms(name, dtype, device, opts.image, opts.repeats)})
        log(f"  vision {name:<7} {dtype:<5} {report.vision[-1]['vision_ms']:8.2f} ms "
            f"({report.vision[-1]['image_tokens']} image tokens)")
