"""Shared helpers of the runtime tests: cached random models, prompts, a toy scaffold, a spy that
records every backend call, and a small scripted numpy backend that drives decoder stop paths."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from blockpilot.runtime.backend import (
    AllowedTokens,
    Backend,
    CacheFullError,
    Prompt,
    PromptError,
    Sampling,
    StepResult,
    TokenArray,
    check_tokens,
)
from blockpilot.vla.config import BlockDiffusionConfig, LMConfig, ModelConfig, SpecialTokens
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.plans import DrivingSchema
from blockpilot.vla.reference_model import build_reference_model, init_weights
from blockpilot.vla.scaffold import Scaffold, build_scaffold
from blockpilot.vla.tokenizer import Tokenizer

# std 0.3 gives random models peaked, input-dependent predictions (0.02 is near uniform).
PEAKED_STD = 0.3


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore. These tiny models are dispatch-bound: extra
    threads buy nothing and, on a shared two-core machine, spin-wait for many times the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def reference(seed: int) -> tuple[VLAModel, Tokenizer]:
    """The reference VLA (vision tower, M-RoPE) and its tokenizer, with random peaked weights."""
    return build_reference_model(seed=seed, std=PEAKED_STD)


@functools.cache
def nuscenes_scaffold() -> Scaffold[Any]:
    return build_scaffold(DrivingSchema.nuscenes(), reference(0)[1])


def image_prompt(tokenizer: Tokenizer, text_tokens: int = 40, seed: int = 0) -> Prompt:
    """One 112x112 camera image (16 image tokens after merging) and ``text_tokens`` text ids."""
    t = tokenizer.special
    rng = np.random.default_rng(seed)
    text = rng.integers(30, 700, text_tokens)
    ids = np.array([1, 9, t.vision_start, *[t.image] * 16, t.vision_end, *text], dtype=np.int64)
    image = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return Prompt(ids, (image,))


TEXT_VOCAB, TEXT_MASK, TEXT_NULL, TEXT_END = 64, 60, 61, 62


@functools.cache
def text_model(seed: int) -> VLAModel:
    """A tiny text-only model (no vision tower, plain 1-D RoPE), vocabulary of 64."""
    lm = LMConfig(vocab_size=TEXT_VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, rope_theta=10_000.0, max_position=512)
    config = ModelConfig(lm=lm, tokens=SpecialTokens(mask=TEXT_MASK, null=TEXT_NULL, end=TEXT_END),
                         diffusion=BlockDiffusionConfig(8, 4))
    model = VLAModel(config).eval()
    init_weights(model, std=0.5, seed=seed)
    return model


@dataclass(frozen=True)
class ToySection:
    key: str
    start: int
    end: int


@dataclass(frozen=True)
class ToyScaffold:
    """A :class:`ScaffoldLike` made by hand: frozen structure tokens around value slots."""

    token_ids: TokenArray
    frozen: npt.NDArray[np.bool_]
    sections: tuple[ToySection, ...]


def toy_scaffold(mask_id: int, seed: int = 0) -> ToyScaffold:
    """Four sections of uneven length (one longer than 32), random frozen runs; the
    ``trajectory`` section opens with a value slot, so its first token is decoded, not given."""
    rng = np.random.default_rng(seed)
    lengths = {"objects": 11, "explanation": 37, "meta": 5, "trajectory": 23}
    sections, frozen_parts, start = [], [], 0
    for key, n in lengths.items():
        sections.append(ToySection(key, start, start + n))
        part = rng.random(n) < 0.4
        part[0] = key != "trajectory"
        frozen_parts.append(part)
        start += n
    frozen = np.concatenate(frozen_parts)
    template = np.where(frozen, rng.integers(10, 50, frozen.size), mask_id).astype(np.int64)
    return ToyScaffold(template, frozen, tuple(sections))


@dataclass(frozen=True)
class Call:
    kind: str  # "prefill" | "step" | "fork" | "truncate"
    batch: int = 1
    start: int = 0
    tokens: int = 0
    mode: AttentionMode | None = None
    write_kv: bool = False
    sampling: Sampling | None = None
    forwarded: bool = False  # a model forward really ran (prefill(length=0) runs none)


@dataclass
class SpyBackend:
    """Wraps a backend and records every call, so tests can count forwards independently of
    :class:`CountingBackend`."""

    inner: Backend
    calls: list[Call] = field(default_factory=list)
    allowed: list[AllowedTokens | None] = field(default_factory=list)  # per step: the typed-slot mask passed

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        res = self.inner.prefill(prompt, length=length, mode=mode)
        n = len(prompt) if length is None else length
        self.calls.append(Call("prefill", 1, 0, n, mode, True, None, forwarded=res.top1.shape[1] > 0))
        return res

    @property
    def constrains_tokens(self) -> bool:
        return bool(getattr(self.inner, "constrains_tokens", False))

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None,
             allowed: AllowedTokens | None = None) -> StepResult:
        extra = {"allowed": allowed} if allowed is not None else {}
        res = self.inner.step(tokens, start, mode=mode, write_kv=write_kv, kv_end=kv_end, sampling=sampling, **extra)
        self.allowed.append(allowed)
        shape = np.asarray(tokens).shape
        self.calls.append(Call("step", shape[0], start, shape[1], mode, write_kv, sampling, forwarded=True))
        return res

    def fork(self, n: int) -> None:
        self.inner.fork(n)
        self.calls.append(Call("fork", n))

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)
        self.calls.append(Call("truncate", start=length))

    def forwards(self, kind: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.forwarded and (kind is None or c.kind == kind)]

    @property
    def forwarded_tokens(self) -> int:
        return sum(c.batch * c.tokens for c in self.forwards())


class ScriptedBackend:
    """A deterministic numpy test double of the :class:`Backend` protocol.

    The prediction made at slot ``s`` (for slot ``s + 1``) is ``script[s + 1]`` with probability
    ``confidence[s + 1]``; slots past the script predict ``end_id``. Cache bookkeeping (length,
    capacity, fork, truncate and their errors) follows the protocol, so decoders driving it must
    use it correctly. Tokens written to the "cache" are kept per row for inspection.
    """

    def __init__(self, script: Sequence[int], confidence: Sequence[float] | None = None, *, end_id: int,
                 vocab_size: int = 64, capacity: int = 256, max_batch: int = 4) -> None:
        self.script = np.asarray(script, dtype=np.int64)
        self.confidence = np.asarray(confidence if confidence is not None else [0.5] * len(script), np.float32)
        self.end_id, self.vocab_size, self.max_batch = end_id, vocab_size, max_batch
        self.written = np.full((1, capacity), -1, dtype=np.int64)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return int(self.written.shape[1])

    def _predict(self, slots: npt.NDArray[np.int64], batch: int) -> StepResult:
        nxt = slots + 1
        inside = nxt < self.script.size
        top1 = np.where(inside, self.script[np.minimum(nxt, self.script.size - 1)], self.end_id)
        prob = np.where(inside, self.confidence[np.minimum(nxt, self.script.size - 1)], 1.0).astype(np.float32)
        return StepResult(np.repeat(top1[None], batch, 0), np.repeat(prob[None], batch, 0))

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        n = len(prompt) if length is None else length
        if len(prompt) > self.capacity:
            raise PromptError(f"prompt of {len(prompt)} tokens exceeds capacity {self.capacity}")
        self.written = np.full((1, self.capacity), -1, dtype=np.int64)
        self.written[0, :n] = prompt.token_ids[:n]
        self._length = n
        if n == 0:
            return StepResult(np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32))
        return self._predict(np.array([n - 1]), 1)

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: Sampling | None = None) -> StepResult:
        arr = check_tokens(tokens, self.vocab_size, self.written.shape[0])
        t = arr.shape[1]
        if start > self._length:
            raise ValueError(f"step at slot {start} leaves a gap: the cache holds {self._length} slots")
        if write_kv:
            if start + t > self.capacity or (kv_end or 0) > self.capacity:
                raise CacheFullError(f"write of {t} token(s) at slot {start} exceeds capacity {self.capacity}")
            self.written[:, start: start + t] = arr
            self._length = max(start + t, kv_end or 0)
        res = self._predict(np.arange(start, start + t), arr.shape[0])
        if sampling is not None:
            return StepResult(res.top1, res.prob, res.top1.copy())
        return res

    def fork(self, n: int) -> None:
        if n > self.max_batch:
            raise ValueError(f"fork({n}) exceeds max_batch {self.max_batch}")
        self.written = np.repeat(self.written[:1], n, axis=0)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"truncate({length}) outside 0..{self._length}")
        self._length = length


def assert_same_step(a: Any, b: Any, tol: float = 1e-5) -> None:
    """Two :class:`StepResult` s agree: identical top-1 ids, probabilities within ``tol``."""
    assert a.top1.shape == b.top1.shape
    assert np.array_equal(a.top1, b.top1)
    assert float(np.abs(a.prob - b.prob).max(initial=0.0)) <= tol


def assert_bundle_plans_like_torch(bundle: Any, checkpoint: Any, frames: int = 2) -> None:
    """The bundle's ONNX Runtime planner and the torch planner of ``checkpoint`` plan the first ``frames``
    held-out keyframes token for token alike (scaffold decoder, one torch thread)."""
    from blockpilot.eval.synthetic import heldout_keyframes, observation
    from blockpilot.runtime.bundle_planner import planner_from_bundle
    from blockpilot.runtime.plan_types import DecoderSettings
    from blockpilot.runtime.planner import Planner

    with torch_threads(1):
        torch_planner = Planner.from_checkpoint(checkpoint, decoder=DecoderSettings(name="scaffold"))
        ort = planner_from_bundle(bundle, decoder=DecoderSettings(name="scaffold"))
        for frame in heldout_keyframes(1, stride=12)[:frames]:
            obs = observation(frame)
            assert np.array_equal(ort.plan(obs).tokens, torch_planner.plan(obs).tokens)


def assert_plans_without_torch(imports: str, opener: str, timeout: float = 300) -> None:
    """In a fresh interpreter: ``imports`` (lines), then ``p = <opener>``, one held-out plan that parses, and no
    torch in ``sys.modules`` afterwards (the car's path stays torch-free)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from blockpilot.eval.synthetic import heldout_keyframes, observation\n"
            "from blockpilot.runtime.plan_types import DecoderSettings\n"
            f"{imports}\n"
            f"p = {opener}\n"
            "plan = p.plan(observation(heldout_keyframes(1)[0]))\n"
            "assert plan.error is None, plan.error\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
