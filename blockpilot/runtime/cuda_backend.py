"""The CUDA backend: the decode-written LM (:mod:`blockpilot.runtime.cuda_lm`) over a static KV cache, with static
input/output buffers, CUDA graphs and a fused top-1 epilogue.

A step pads its window to the smallest token bucket that holds it (1, 2, 4, ... up to ``max(64, block_size)``;
wider steps and prefills run eagerly at their own width). Its inputs land in static device buffers: token ids,
and one int32 vector ``[start, key_end, mode, tokens]`` that the attention kernel, the RoPE positions and the
slot map read on the device. One CUDA graph per ``(rows, bucket, write_kv, sampling)`` therefore serves every
position and every attention mode. Padding positions write their K/V into scratch slots past ``capacity``
(never attended: ``key_end <= capacity``), so a padded step leaves the valid cache as an exact one would.

Outputs are reduced on the device (top-1 id and probability by the Triton epilogue
:func:`blockpilot.kernels.top1.top1_prob`, the mask token excluded); only ``(rows, tokens)`` arrays come back,
through pinned host buffers and one stream sync. Sampling draws in the same graph with the counter-based Gumbel
keys of :mod:`blockpilot.runtime.sampling` (the torch backend's draw); it materialises float32 logits and
``(rows, T, vocab)`` noise, so sampled steps cost more memory than greedy ones.

Prefill runs eagerly (the vision tower and the embedding of image features are the model's own modules); the
window is written into the cache by the same forward. Step, fork and truncate arguments are checked by the
shared contract (:func:`blockpilot.runtime.backend.check_step`): a draft step (``write_kv=False``) must fit the
cache too, as on every backend.

``device="cpu"`` (graphs off, ``kernel="reference"`` or, under ``TRITON_INTERPRET=1``, ``"triton"``) runs the same
code on the CPU: that is how the parity tests check it without a GPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..vla.image_policy import ImagePolicy
from ..vla.model import VLAModel
from ..vla.modes import AttentionMode
from .backend import (
    AllowedTokens,
    Prompt,
    Sampling,
    StepResult,
    TokenArray,
    check_fork,
    check_step,
    check_truncate,
    prefill_length,
)
from .cuda_graphs import TorchStepGraphs
from .cuda_lm import AttentionFn, DecodeLM, EpilogueFn, PrefixStep, top1_prob_ref
from .plan_types import PlannerSetupError
from .torch_backend import prompt_embeddings

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
KERNELS = ("triton", "reference")


def _kernels(kind: str) -> tuple[AttentionFn, EpilogueFn]:
    if kind == "reference":
        from ..kernels.reference import block_diffusion_attention_ref

        return block_diffusion_attention_ref, top1_prob_ref
    try:
        from ..kernels.block_attention import block_diffusion_attention
        from ..kernels.top1 import top1_prob
    except ImportError as exc:
        raise PlannerSetupError(f"the CUDA backend's kernels need triton: pip install 'blockpilot[plugin]' ({exc})") \
            from exc
    return block_diffusion_attention, top1_prob


def _precision_of(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "bf16")


def _checked_device(asked: str | torch.device | None, model_device: torch.device) -> torch.device:
    device = torch.device(asked) if asked is not None else model_device
    if device.type != "cuda" and asked is None:
        raise PlannerSetupError(f"the cuda backend runs on a CUDA device; the model is on {device} "
                                "(load it with device='cuda', or pass device='cpu' to check the code on a CPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlannerSetupError(f"the cuda backend needs a CUDA GPU, and this torch build sees none "
                                f"(torch {torch.__version__})")
    if device.type not in ("cuda", "cpu"):
        raise PlannerSetupError(f"the cuda backend runs on cuda (or cpu for checks), not {device}")
    return device


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise PlannerSetupError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise PlannerSetupError(f"FP8 matmuls need compute capability 8.9 or newer; "
                                f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")


class CudaBackend:
    """Implements :class:`blockpilot.runtime.backend.Backend` on a CUDA device.

    ``precision``: ``fp32``, ``bf16``, ``fp16`` or ``fp8`` (FP8 e4m3 linears with bf16 activations; scales from the
    model's modelopt quantizers when it has them, else per-channel from the weights; ``activation_scale``
    ``dynamic`` or ``static``, the latter from modelopt's input quantizers). Default: the model's dtype.
    ``device``: default the model's; a CPU device only for checking (graphs off). ``graphs``: capture CUDA graphs
    (default on CUDA). ``kernel``: ``triton`` (default on CUDA) or ``reference`` (torch; default on CPU).
    ``buckets``: the padded step widths (``()``: no padding, every step eager at its own width).
    ``compute_dtype`` overrides the activation/cache dtype of ``precision`` (fp8 weights with float32 activations
    on a CPU is modelopt's fake-quantized arithmetic, for checks).
    ``prefix_reuse`` (off by default; an APPROXIMATION): drafts (``write_kv=False``, block or bidirectional mode)
    repeated at the same ``(rows, start, tokens, key_end, mode)`` reuse the prefix attention states the first such
    draft stored (:mod:`blockpilot.runtime.cuda_lm`); any other call (prefill, a step that writes the cache,
    truncate, fork, another window) drops them. Those drafts run eagerly (no graph), in torch attention math.
    """

    image_policy: ImagePolicy | None = None  # the checkpoint's, set by the planner (resizes the prompt's images)
    constrains_tokens = True  # step(allowed=...): eager steps, the logits masked in the head

    def __init__(self, model: VLAModel, capacity: int, max_batch: int = 1, *, device: str | torch.device | None = None,
                 precision: str | None = None, graphs: bool | None = None, kernel: str | None = None,
                 activation_scale: str = "dynamic", fp8_per_channel: bool = True,
                 buckets: tuple[int, ...] | None = None, compute_dtype: torch.dtype | None = None,
                 prefix_reuse: bool = False) -> None:
        if capacity <= 0 or max_batch <= 0:
            raise ValueError(f"capacity and max_batch must be positive, got {capacity}, {max_batch}")
        p = next(model.parameters())
        self.device = _checked_device(device, p.device)
        on_cuda = self.device.type == "cuda"
        self.precision = precision or _precision_of(p.dtype)
        _check_precision(self.precision, self.device)
        self.kernel = kernel or ("triton" if on_cuda else "reference")
        if self.kernel not in KERNELS:
            raise PlannerSetupError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        self.graphs = TorchStepGraphs(on_cuda if graphs is None else graphs)
        if self.graphs.enabled and (not on_cuda or self.kernel == "reference"):
            raise PlannerSetupError("CUDA graphs need a CUDA device and the Triton kernels (the torch reference "
                                    "attention reads its scalars on the host); pass graphs=False")
        self.dtype = compute_dtype or PRECISIONS[self.precision]
        self.config = model.config
        self.source_model = model.eval()  # the vision tower and image embedding run through its modules
        attention, epilogue = _kernels(self.kernel)
        self.lm = DecodeLM(model.lm, device=self.device, dtype=self.dtype, attention=attention, epilogue=epilogue,
                           block_size=model.config.diffusion.block_size, mask_id=model.config.tokens.mask,
                           fp8=self.precision == "fp8", fp8_per_channel=fp8_per_channel,
                           activation_scale=activation_scale)
        block = model.config.diffusion.block_size
        widest = max(64, block)
        self.buckets = tuple(sorted({1, 2, 4, 8, 16, 32, 64, block} & set(range(1, widest + 1)))) \
            if buckets is None else tuple(sorted(set(buckets)))
        if any(b < 1 for b in self.buckets):
            raise PlannerSetupError(f"buckets must be positive token counts, got {buckets}")
        self._capacity = capacity
        self.prefix_reuse = prefix_reuse
        self._prefix_key: tuple[int, ...] | None = None  # the window whose prefix states the LM holds
        self._max_batch = max_batch
        cfg = model.config.lm
        slots = capacity + (self.buckets[-1] if self.buckets else 0)  # scratch slots for padding positions
        shape = (cfg.num_layers, 1, cfg.num_kv_heads, slots, cfg.head_dim)
        self._single = self._new_cache(shape)
        multi = (cfg.num_layers, max_batch, cfg.num_kv_heads, slots, cfg.head_dim)
        self._multi = self._new_cache(multi) if max_batch > 1 else None
        self._length = 0
        self._rows = 1
        # Static inputs: token ids, [start, key_end, mode, tokens], RoPE deltas, sampling seeds and temperature.
        width = self.buckets[-1] if self.buckets else 1
        pin = on_cuda
        self._ids_host = torch.zeros(max_batch, width, dtype=torch.int64, pin_memory=pin)
        self._ids = torch.zeros(max_batch, width, dtype=torch.int64, device=self.device)
        self._scalars_host = torch.zeros(4, dtype=torch.int32, pin_memory=pin)
        self._scalars = torch.zeros(4, dtype=torch.int32, device=self.device)
        self._seeds_host = torch.zeros(max_batch, dtype=torch.int64, pin_memory=pin)
        self._seeds = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        self._temperature_host = torch.ones(1, dtype=torch.float32, pin_memory=pin)
        self._temperature = torch.ones(1, dtype=torch.float32, device=self.device)
        self._delta = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        self._offsets = torch.arange(width, dtype=torch.int64, device=self.device)
        self._table: tuple[object, torch.Tensor] | None = None  # typed slots: (host table, its device copy)
        self._out_host = (torch.zeros(max_batch, width, dtype=torch.int64, pin_memory=pin),
                          torch.zeros(max_batch, width, dtype=torch.float32, pin_memory=pin),
                          torch.zeros(max_batch, width, dtype=torch.int64, pin_memory=pin))

    def _new_cache(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def weight_bytes(self) -> int:
        return self.lm.weight_bytes()

    def _cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows == 1:
            return self._single
        assert self._multi is not None
        return self._multi[0][:, : self._rows], self._multi[1][:, : self._rows]

    def _positions(self, slots_q: torch.Tensor, rows: int) -> torch.Tensor:
        """RoPE positions ``(rows, T)`` (``(3, rows, T)`` for M-RoPE) of window slots ``slots_q`` after the prompt."""
        pos = slots_q[None, :] + self._delta[:rows, None]
        return pos[None].expand(3, -1, -1) if self.config.lm.mrope_section is not None else pos

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        n = prefill_length(prompt, length, self.capacity)
        self._rows, self._length = 1, 0
        self._drop_prefix()
        self._delta.zero_()
        stage: dict[str, float] = {}
        embeds, positions, delta = prompt_embeddings(self.source_model, prompt, n, stage,
                                                     self.image_policy)
        if delta is not None:
            self._delta[:1] = delta.to(self.device)
        if n == 0:
            return StepResult(np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.float32), None, stage)
        t0 = time.perf_counter()
        slots = torch.arange(n, device=self.device)
        pos = positions[..., :n].to(self.device) if positions is not None else self._positions(slots, 1)
        scalars = torch.tensor([0, n, AttentionMode(mode).id], dtype=torch.int32, device=self.device)
        k, v = self._single
        hidden = self.lm.forward(embeds[:, :n].to(self.device, self.dtype), pos, slots, scalars[0:1], scalars[1:2],
                                 scalars[2:3], k, v, write_kv=True)
        top1, prob, _ = self.lm.head(hidden[:, -1:])
        result = StepResult(top1.cpu().numpy().astype(np.int64), prob.float().cpu().numpy().astype(np.float32),
                            None, stage)
        stage["prefill"] = (time.perf_counter() - t0) * 1e3
        self._length = n
        return result

    @torch.inference_mode()
    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        rows = self._rows
        checked = check_step(tokens, start, length=self._length, capacity=self.capacity, batch=rows,
                             vocab_size=self.config.lm.vocab_size, write_kv=write_kv, kv_end=kv_end,
                             sampling=sampling, allowed=allowed)
        arr, t, end = checked.tokens, checked.tokens.shape[1], checked.key_end
        bucket = next((b for b in self.buckets if b >= t), None)
        width = bucket or t
        prefix = self._prefix_step(rows, start, t, width, end, AttentionMode(mode).id, write_kv)
        ids_host = self._ids_host if bucket is not None else torch.zeros(rows, t, dtype=torch.int64)
        ids_host[:rows, :t] = torch.from_numpy(arr)
        ids_host[:rows, t:width] = 0
        self._scalars_host.copy_(torch.tensor([start, end, AttentionMode(mode).id, t], dtype=torch.int32))
        self._scalars.copy_(self._scalars_host, non_blocking=True)
        if sampling is not None:
            self._seeds_host[:rows] = torch.tensor(sampling.seeds, dtype=torch.int64)
            self._seeds.copy_(self._seeds_host, non_blocking=True)
            self._temperature_host.fill_(sampling.temperature)
            self._temperature.copy_(self._temperature_host, non_blocking=True)
        if allowed is not None:  # typed value slots: eager (the rows change every step), masked in the head
            ids = ids_host[:rows, :width].to(self.device)
            outputs = self._window(ids, rows, width, write_kv, sampling is not None, padded=bucket is not None,
                                   prefix=prefix, allowed=self._allowed_rows(allowed, width))
        elif bucket is None:  # wider than every bucket: eager, at its own width
            ids = ids_host.to(self.device)
            outputs = self._window(ids, rows, t, write_kv, sampling is not None, padded=False, prefix=prefix)
        elif prefix is not None:  # host-dependent: eager, never captured
            self._ids.copy_(self._ids_host, non_blocking=True)
            outputs = self._window(self._ids[:rows, :bucket], rows, bucket, write_kv, sampling is not None,
                                   padded=True, prefix=prefix)
        else:
            self._ids.copy_(self._ids_host, non_blocking=True)
            key = (rows, bucket, write_kv, sampling is not None)
            outputs = self.graphs.run(key, lambda: self._window(self._ids[:rows, :bucket], rows, bucket, write_kv,
                                                                sampling is not None, padded=True))
        top1, prob, sampled = self._to_host(outputs, rows, t)
        if write_kv:
            self._length = end
        return StepResult(top1, prob, sampled)

    def _drop_prefix(self) -> None:
        self._prefix_key = None
        self.lm.clear_prefix()

    def _prefix_step(self, rows: int, start: int, t: int, width: int, end: int, mode: int,
                     write_kv: bool) -> PrefixStep | None:
        """The split of this step under ``prefix_reuse`` (``None``: the plain forward), keeping the stored window."""
        if not self.prefix_reuse or write_kv or mode == AttentionMode.CAUSAL.id:
            if self.prefix_reuse:
                self._drop_prefix()
            return None
        key = (rows, start, t, width, end, mode)
        reuse = key == self._prefix_key
        self._prefix_key = key
        return PrefixStep(reuse, start, end, mode)

    def _allowed_rows(self, allowed: AllowedTokens, width: int) -> torch.Tensor:
        """``(rows, width, V)`` bool: the table (uploaded once per table object) gathered by class, padding
        positions unconstrained (class 0)."""
        if self._table is None or self._table[0] is not allowed.table:
            self._table = (allowed.table, torch.from_numpy(np.array(allowed.table, dtype=np.bool_)).to(self.device))
        classes = np.zeros((allowed.classes.shape[0], width), dtype=np.int64)
        classes[:, : allowed.classes.shape[1]] = allowed.classes
        return self._table[1][torch.from_numpy(classes).to(self.device)]

    def _window(self, ids: torch.Tensor, rows: int, width: int, write_kv: bool, sampled: bool,
                padded: bool, prefix: PrefixStep | None = None,
                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The device work of one step over static inputs: no host sync, so it can be captured."""
        start, key_end, mode, count = (self._scalars[i: i + 1] for i in range(4))
        offsets = self._offsets[:width] if padded else torch.arange(width, device=self.device)
        slots_q = start.long() + offsets
        # Padding positions write into the scratch slots past capacity, which no query ever attends.
        valid = offsets < count.long() if padded else None
        slots = slots_q if valid is None else torch.where(valid, slots_q, self._capacity + offsets)
        k, v = self._cache()
        x = torch.nn.functional.embedding(ids, self.lm.embed)
        hidden = self.lm.forward(x, self._positions(slots_q, rows), slots, start, key_end, mode, k, v, write_kv,
                                 valid, prefix)
        sampling = (self._seeds[:rows], slots_q, self._temperature) if sampled else None
        top1, prob, drawn = self.lm.head(hidden, sampling, allowed)
        return (top1, prob) if drawn is None else (top1, prob, drawn)

    def _to_host(self, outputs: tuple[torch.Tensor, ...], rows: int,
                 t: int) -> tuple[TokenArray, np.ndarray, TokenArray | None]:
        host = self._out_host
        width = min(t, host[0].shape[1])
        if t > width:  # an eager step wider than the buffers
            arrays = [o[:, :t].to("cpu") for o in outputs]
        else:
            for dst, src in zip(host, outputs, strict=False):
                dst[:rows, :t].copy_(src[:, :t], non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            arrays = [h[:rows, :t] for h in host[: len(outputs)]]
        top1 = arrays[0].numpy().astype(np.int64)
        prob = arrays[1].float().numpy().astype(np.float32)
        sampled = arrays[2].numpy().astype(np.int64) if len(arrays) > 2 else None
        return top1, prob, sampled

    def fork(self, n: int) -> None:
        check_fork(n, rows=self._rows, max_batch=self.max_batch)
        self._drop_prefix()
        if n == 1 or self._multi is None:
            return
        end = self._length
        with torch.inference_mode():
            for multi, single in zip(self._multi, self._single, strict=True):
                multi[:, :n, :, :end] = single[:, :1, :, :end]
            self._delta[1:n] = self._delta[0]
        self._rows = n

    def truncate(self, length: int) -> None:
        check_truncate(length, self._length)
        self._drop_prefix()
        self._length = length
