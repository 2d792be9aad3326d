"""Parity with the published Fast-dLLM v2 ``generate``: the sub-block cache rule against an oracle
written from the published rules, the bf16 confidence arithmetic, and prompts holding the mask id.

``block`` without the sub-block cache against a cache-free reference is covered by
``tests/test_block_threshold.py::test_block_threshold_equals_the_cache_free_reference``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_fixtures import (
    TEXT_END,
    TEXT_MASK,
    ScriptedBackend,
    SpyBackend,
    image_prompt,
    reference,
    text_model,
)

from blockpilot.runtime.backend import BackendError, Prompt, PromptError, StepResult, TokenArray
from blockpilot.runtime.confidence import top1_probability
from blockpilot.runtime.decoders import BlockOptions, MaskInPromptError, block_threshold
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError
from blockpilot.runtime.planner import Planner
from blockpilot.runtime.published_generate import published_generate
from blockpilot.runtime.torch_backend import TorchBackend
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.model import VLAModel
from blockpilot.vla.modes import AttentionMode
from blockpilot.vla.prompt import DRIVING_SYSTEM_PROMPT, chat_prompt_ids

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "reference"


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _shipped() -> tuple[VLAModel, list[int], int, int]:
    model = load_model(SHIPPED)
    tokenizer = load_tokenizer(SHIPPED, model.config)
    text = ("Ego speed 6.2 m/s, acceleration 0.1 m/s^2. Past positions (m): (-9.0, 0.1) (-6.1, 0.0) (-3.0, 0.0) "
            "(0.0, 0.0). Command: turn left. Answer with the plan.")
    ids = chat_prompt_ids(tokenizer, DRIVING_SYSTEM_PROMPT, text, [])
    return model, ids, tokenizer.special.mask, tokenizer.special.end


def _compare(model: VLAModel, ids: list[int], options: BlockOptions, capacity: int = 512,
             images: tuple[np.ndarray, ...] = ()) -> list[str]:
    """Run the runtime decoder and the oracle; assert identical tokens, stop and forwards. Returns
    the oracle's forward kinds."""
    spy = SpyBackend(TorchBackend(model, capacity))
    got = block_threshold(spy, Prompt(np.array(ids), images), options)
    want = published_generate(model, ids, mask_id=options.mask_id, end_id=options.end_id,
                              block_size=options.block_size, sub_block_size=options.sub_block_size,
                              threshold=options.threshold, max_new_tokens=options.max_new_tokens,
                              use_block_cache=options.sub_block_cache, images=images)
    assert got.tokens[0].tolist() == want.tokens
    assert got.stop == want.stop
    # The same forwards in the same order: where each starts and how many tokens it runs.
    assert [(c.start, c.tokens) for c in spy.forwards()] == [(s, n) for _, s, n in want.forwards]
    assert got.forwards == len(want.forwards)
    return [kind for kind, _, _ in want.forwards]


# (prompt length, threshold): aligned, unaligned, shorter than a block, a prompt tail that fills
# sub-block 0 and opens sub-block 1 (so sub-block 1 starts on a known token).
RANDOM_CASES = [(64, 1.0), (45, 1.0), (20, 0.5), (41, 1.0), (45, 0.5)]


@pytest.mark.parametrize(("prompt_len", "threshold"), RANDOM_CASES)
def test_published_rule_equals_the_oracle_on_the_random_reference_model(prompt_len: int, threshold: float) -> None:
    model, tokenizer = reference(1)
    ids = np.random.default_rng(prompt_len).integers(30, 700, prompt_len).tolist()
    options = BlockOptions(tokenizer.special.mask, -1, 32, 8, threshold, 70, sub_block_cache=True)
    kinds = _compare(model, ids, options)
    # Three blocks: each opens with a whole-block step and runs sub-block-only steps too.
    assert kinds.count("commit") == 2 and kinds.count("block") >= 3 and kinds.count("sub") > 0


@pytest.mark.parametrize("cached", [True, False])
def test_published_rule_equals_the_oracle_with_a_camera_image(cached: bool) -> None:
    model, tokenizer = reference(2)
    prompt = image_prompt(tokenizer, seed=2)  # 60 tokens, the image inside the first block
    options = BlockOptions(tokenizer.special.mask, -1, 32, 8, 0.7, 40, sub_block_cache=cached)
    _compare(model, prompt.token_ids.tolist(), options, images=prompt.images)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_published_rule_equals_the_oracle_on_a_small_text_model(seed: int) -> None:
    ids = np.random.default_rng(seed).integers(0, 56, 11 + seed).tolist()
    _compare(text_model(seed), ids, BlockOptions(TEXT_MASK, TEXT_END, 8, 4, 0.6, 30, sub_block_cache=True), 128)


@pytest.mark.parametrize("threshold", [0.9, 1.0])
def test_published_rule_equals_the_oracle_on_the_shipped_model(threshold: float) -> None:
    model, ids, mask, end = _shipped()
    kinds = _compare(model, ids, BlockOptions(mask, end, 32, 8, threshold, 160, sub_block_cache=True), 1024)
    assert "sub" in kinds


def test_without_the_cache_the_oracle_is_the_plain_block_decoder() -> None:
    model, tokenizer = reference(2)
    ids = np.random.default_rng(5).integers(30, 700, 45).tolist()
    kinds = _compare(model, ids, BlockOptions(tokenizer.special.mask, -1, 32, 8, 0.5, 50))
    assert "sub" not in kinds


def _widths(rule: str, confidence: dict[int, float]) -> list[int]:
    # Block 8, sub-blocks of 4, an aligned 8-token prompt: block 1 holds the seed and 7 masks.
    prompt = list(range(1, 9))
    script = prompt + list(range(20, 40))
    conf = [0.5] * len(script)
    for k, c in confidence.items():
        conf[len(prompt) + k] = c
    spy = SpyBackend(ScriptedBackend(script, conf, end_id=TEXT_END))
    options = BlockOptions(TEXT_MASK, TEXT_END, 8, 4, 0.9, 8, sub_block_cache=True, sub_block_rule=rule)
    got = block_threshold(spy, Prompt(np.array(prompt)), options)
    assert got.tokens[0].tolist() == script[8:16]
    return [c.tokens for c in spy.forwards("step")]


def test_published_rule_runs_the_whole_block_while_the_sub_blocks_first_token_is_masked() -> None:
    # One fill per step, the first masked position first: sub-block 0 opens the block (whole), then
    # runs alone; sub-block 1's first token is filled by its whole-block step, then it runs alone.
    assert _widths("published", {}) == [8, 4, 4, 8, 4, 4, 4]
    # Sub-block 1's first position (block position 4) is the least confident: filled last, so every
    # step of sub-block 1 runs the whole block.
    assert _widths("published", {4: 0.1}) == [8, 4, 4, 8, 8, 8, 8]


def test_window_rule_runs_the_whole_block_once_per_sub_block_and_a_window_after() -> None:
    assert _widths("window", {}) == [8, 8, 8, 8, 5, 5, 5]
    assert _widths("window", {4: 0.1}) == [8, 8, 8, 8, 5, 5, 5]


def test_stale_block_cache_of_the_published_code_is_reproducible_and_changes_only_later_blocks() -> None:
    model, tokenizer = reference(1)
    ids = np.random.default_rng(3).integers(30, 700, 45).tolist()
    kwargs = dict(mask_id=tokenizer.special.mask, end_id=-1, block_size=32, sub_block_size=8, threshold=1.0,
                  max_new_tokens=70, use_block_cache=True)
    fresh = published_generate(model, ids, **kwargs)  # type: ignore[arg-type]
    stale = published_generate(model, ids, stale_block_cache=True, **kwargs)  # type: ignore[arg-type]
    first_block = 64 - 45  # the generated part of the prompt's partial block
    assert stale.tokens[:first_block] == fresh.tokens[:first_block]
    # Stale: sub-block 0 of a later block opens with a sub-block step; fresh: with a whole-block step.
    after_commit = [fresh.forwards[i + 1][0] for i, f in enumerate(fresh.forwards) if f[0] == "commit"]
    stale_after = [stale.forwards[i + 1][0] for i, f in enumerate(stale.forwards) if f[0] == "commit"]
    assert set(after_commit) == {"block"} and set(stale_after) == {"sub"}


# --- a prompt holding the mask id --------------------------------------------------------------


def test_a_mask_id_opening_the_last_partial_block_is_refused_by_name() -> None:
    # This prompt crashed with "argmax of an empty sequence": block position 0 can never be filled.
    ids = [*range(1, 9), TEXT_MASK, 11, 12]
    backend = ScriptedBackend([*ids, *range(20, 40)], end_id=TEXT_END)
    with pytest.raises(MaskInPromptError, match=r"mask token id 60 at position\(s\) 8;") as info:
        block_threshold(backend, Prompt(np.array(ids)), BlockOptions(TEXT_MASK, TEXT_END, 8, 4, 0.9, 10))
    assert info.value.positions == (8,)
    assert isinstance(info.value, PromptError) and backend.length == 0  # refused before any forward


def test_a_mask_id_anywhere_in_the_prompt_is_refused() -> None:
    ids = [TEXT_MASK, 2, 3, TEXT_MASK, 5]
    with pytest.raises(MaskInPromptError, match=r"position\(s\) 0, 3;"):
        block_threshold(ScriptedBackend(ids, end_id=TEXT_END), Prompt(np.array(ids)),
                        BlockOptions(TEXT_MASK, TEXT_END, 8, 4, 0.9, 10))


@pytest.mark.parametrize("decoder", ["ar", "ar_free", "block", "scaffold", "rollouts"])
def test_the_planner_refuses_a_mask_id_for_every_decoder(decoder: str) -> None:
    model, tokenizer = reference(0)
    planner = Planner.from_model(model, tokenizer, decoder=DecoderSettings(name=decoder, rollouts=2),
                                 max_prompt_tokens=64)
    ids = np.array([1, 9, 30, 31, tokenizer.special.mask, 33], dtype=np.int64)
    with pytest.raises(MaskInPromptError, match=r"position\(s\) 4;") as info:
        planner.decode(planner.backend, Prompt(ids))
    assert isinstance(info.value, BackendError)
    assert planner.backend.length == 0


# --- the published bf16 confidence arithmetic ---------------------------------------------------


def _logits_for(probs: list[float], vocab: int = 64) -> torch.Tensor:
    """float32 logits whose softmax's top-1 probability at each position is ``probs[i]``."""
    rows = []
    for i, p in enumerate(probs):
        rest = (1 - p) / (vocab - 1)
        row = torch.full((vocab,), float(np.log(rest)))
        row[20 + i] = float(np.log(p))
        rows.append(row)
    return torch.stack(rows)


def test_model_dtype_softmax_ties_near_one_and_picks_the_first() -> None:
    logits = _logits_for([0.9985, 0.9995, 0.9])
    prob32, top32 = top1_probability(logits, torch.bfloat16, "float32")
    prob16, top16 = top1_probability(logits.bfloat16(), torch.bfloat16, "model")
    assert top32.tolist() == top16.tolist() == [20, 21, 22]
    assert prob32[1] > prob32[0] and int(prob32.argmax()) == 1  # float32: the truly most confident
    assert prob16[0] == prob16[1] == 1.0 and int(prob16.argmax()) == 0  # bf16: a tie, the first wins
    # In float32 the model's dtype is ignored; "model" on a float32 model is the float32 result.
    assert torch.equal(top1_probability(logits, torch.float32, "model")[0], prob32)


class _LogitsBackend:
    """Replays fixed per-slot logits through the runtime's confidence arithmetic (a device stand-in)."""

    def __init__(self, logits: torch.Tensor, softmax_dtype: str) -> None:
        self.prob, self.top1 = top1_probability(logits.bfloat16(), torch.bfloat16, softmax_dtype)
        self._length = 0
        self.inputs: list[TokenArray] = []  # the tokens of every step, as the decoder sent them

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return 64

    def _at(self, slots: np.ndarray) -> StepResult:
        return StepResult(self.top1.numpy()[slots][None].astype(np.int64), self.prob.numpy()[slots][None])

    def prefill(self, prompt: Prompt, *, length: int | None = None,
                mode: AttentionMode = AttentionMode.CAUSAL) -> StepResult:
        self._length = len(prompt) if length is None else length
        return self._at(np.array([self._length - 1]))

    def step(self, tokens: TokenArray, start: int, *, mode: AttentionMode, write_kv: bool,
             kv_end: int | None = None, sampling: object = None) -> StepResult:
        self.inputs.append(np.array(tokens))
        if write_kv:
            self._length = max(start + tokens.shape[1], kv_end or 0)
        return self._at(np.arange(start, start + tokens.shape[1]))

    def fork(self, n: int) -> None:
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        self._length = length


@pytest.mark.parametrize(("softmax_dtype", "first_filled"), [("float32", 3), ("model", 2)])
def test_block_decoder_fills_the_first_of_a_bf16_tie(softmax_dtype: str, first_filled: int) -> None:
    # Prompt of 8, block 8, one sub-block of 8, threshold 1 (the published default: one token per
    # step). Block positions 1..7 are predicted at slots 8..14; slots 9 and 10 (positions 2 and 3)
    # are 0.9985 and 0.9995 confident, the rest 0.6.
    probs = [0.6] * 8 + [0.6, 0.9985, 0.9995, 0.6, 0.6, 0.6, 0.6, 0.6]
    backend = _LogitsBackend(_logits_for(probs), softmax_dtype)
    decoded = block_threshold(backend, Prompt(np.arange(1, 9)), BlockOptions(TEXT_MASK, TEXT_END, 8, 8, 1.0, 7))
    assert decoded.tokens[0].tolist() == list(range(27, 34))  # slot s predicts id 20 + s (the seed: slot 7)
    # The second step's input shows which position the first step filled: only that one.
    second = backend.inputs[1][0]
    assert np.flatnonzero(second[1:] != TEXT_MASK).tolist() == [first_filled - 1]
    conf = backend.prob.numpy()[9:11]
    assert (conf[0] == conf[1]) == (softmax_dtype == "model")


def test_torch_backend_model_dtype_softmax_on_a_bf16_model() -> None:
    model = text_model(0)
    bf16 = VLAModel(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    prompt = Prompt(np.random.default_rng(0).integers(0, 56, 12))
    results = {}
    for dtype in ("float32", "model"):
        backend = TorchBackend(bf16, 64, softmax_dtype=dtype)
        backend.prefill(prompt, length=8)
        results[dtype] = backend.step(np.full((1, 8), TEXT_MASK), 8, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    model_prob = torch.from_numpy(results["model"].prob)
    assert torch.equal(model_prob, model_prob.bfloat16().float())  # bf16 values
    fp32_prob = torch.from_numpy(results["float32"].prob)
    assert not torch.equal(fp32_prob, fp32_prob.bfloat16().float())
    assert np.abs(results["model"].prob - results["float32"].prob).max() < 2**-7
    with pytest.raises(ValueError, match="softmax_dtype"):
        TorchBackend(bf16, 64, softmax_dtype="float16")


def test_settings_and_planner_wiring() -> None:
    model, tokenizer = reference(0)
    with pytest.raises(PlannerSetupError, match="sub_block_rule"):
        DecoderSettings(name="block", sub_block_rule="always")
    with pytest.raises(PlannerSetupError, match="softmax_dtype"):
        DecoderSettings(softmax_dtype="bf16")
    with pytest.raises(ValueError, match="sub_block_rule"):
        BlockOptions(1, 2, sub_block_rule="always")
    cached = DecoderSettings(name="block", sub_block_cache=True, sub_block_rule="window").to_dict()
    assert cached["sub_block_rule"] == "window" and "sub_block_rule" not in DecoderSettings(name="block").to_dict()
    planner = Planner.from_model(model, tokenizer, decoder=DecoderSettings(softmax_dtype="model"), max_prompt_tokens=64)
    assert planner.backend.softmax_dtype == "model"  # type: ignore[attr-defined]
    assert planner.settings.to_dict()["softmax_dtype"] == "model"
    with pytest.raises(PlannerSetupError, match="softmax_dtype 'model' needs a backend"):
        Planner(TorchBackend(model, 512), model.config, tokenizer, decoder=DecoderSettings(softmax_dtype="model"))


def test_plan_cli_takes_the_rule_and_the_softmax_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from PIL import Image

    from blockpilot.cli import main
    from blockpilot.demo import road_image

    image = tmp_path / "front.png"
    Image.fromarray(road_image(112)).save(image)
    ego = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'
    rc = main(["plan", "--checkpoint", str(SHIPPED), "--image", str(image), "--ego", ego, "--decoder", "block",
               "--sub-block-cache", "--sub-block-rule", "window", "--softmax-dtype", "model"])
    assert rc == 0
    settings = json.loads(capsys.readouterr().out)["stats"]["settings"]
    assert (settings["sub_block_cache"], settings["sub_block_rule"], settings["softmax_dtype"]) == (True, "window",
                                                                                                  "model")


@pytest.mark.parametrize("rule", ["published", "window"])
def test_sub_block_rules_on_onnx_runtime_equal_the_torch_backend(rule: str, tmp_path_factory: pytest.TempPathFactory,
                                                                 ) -> None:
    pytest.importorskip("onnxruntime")
    from blockpilot.eval.synthetic import heldout_keyframes, observation
    from blockpilot.runtime.ort_backend import ort_planner

    graphs = _onnx_graphs(tmp_path_factory)
    settings = DecoderSettings(name="block", sub_block_cache=True, sub_block_rule=rule)
    ort = ort_planner(SHIPPED, graphs, decoder=settings)
    ref = Planner.from_model(_shipped()[0], load_tokenizer(SHIPPED, _shipped()[0].config), decoder=settings,
                             max_prompt_tokens=ORT_CAPACITY - 200)
    for frame in heldout_keyframes(1)[:2]:
        a, b = ort.plan(observation(frame)), ref.plan(observation(frame))
        assert a.tokens.tolist() == b.tokens.tolist() and a.stats.forwards == b.stats.forwards


ORT_CAPACITY = 512


@functools.cache
def _onnx_graphs_at(root: str) -> Path:
    from blockpilot.export import export_onnx

    out = Path(root) / "onnx"
    export_onnx(load_model(SHIPPED), out, ORT_CAPACITY)
    return out


def _onnx_graphs(factory: pytest.TempPathFactory) -> Path:
    return _onnx_graphs_at(str(factory.getbasetemp()))
