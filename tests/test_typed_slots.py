"""Typed value slots: the token automata of each slot kind, and the mask they make applied by the backends."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import image_prompt, torch_threads

from blockpilot.runtime.backend import AllowedTokens, Prompt
from blockpilot.runtime.decoders import SpeculativeOptions, ar_greedy, scaffold_speculative
from blockpilot.vla.config import SpecialTokens
from blockpilot.vla.plans import DrivingSchema, RobotActionSchema
from blockpilot.vla.scaffold import Scaffold, build_scaffold
from blockpilot.vla.schema import SchemaLayout, Section
from blockpilot.vla.slot_constraints import ConstraintError, SlotConstraints, build_constraints
from blockpilot.vla.slots import Categorical, FixedNumber, FreeText


class QwenLikeCodec:
    """A tokenizer with multi-character tokens (``+0``, ``12``, ``.5``, ``left``, ``_turn``, ``a"`` ...) over
    single printable characters, encoding greedily by longest match; ids 0..3 are special."""

    MULTI = ("+0", "-0", "12", "00", ".5", "5.", "+1", "left", "_turn", "right", "straight", "stop", 'a"', "\\n",
             "x\\", "ok", " the", "ab")

    def __init__(self) -> None:
        self.texts = ["<|mask|>", "<|null|>", "<|end|>", "<|im_start|>", *string.printable[:95], *self.MULTI, "\x01"]
        self._special = SpecialTokens(mask=0, null=1, end=2)
        self.special_ids = frozenset({0, 1, 2, 3})

    @property
    def special(self) -> SpecialTokens:
        return self._special

    @property
    def vocab_size(self) -> int:
        return len(self.texts)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        order = sorted(range(len(self.texts)), key=lambda t: -len(self.texts[t]))
        while i < len(text):
            tok = next(t for t in order if text.startswith(self.texts[t], i))
            out.append(tok)
            i += len(self.texts[tok])
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        return "".join(self.texts[int(i)] for i in ids if not (skip_special_tokens and int(i) in self.special_ids))


class _Schema:
    """A one-section schema around one slot kind (scaffold + parse through the real layout)."""

    def __init__(self, kind: Any) -> None:
        self.layout = SchemaLayout((Section("value", kind),))

    def sections_from_plan(self, plan: object) -> dict[str, object]:
        return {"value": plan}

    def plan_from_sections(self, sections: Any) -> object:
        return sections["value"]


def random_fill(scaffold: Scaffold[Any], constraints: SlotConstraints, rng: np.random.Generator) -> np.ndarray:
    """An answer drawn position by position among the allowed tokens (frozen positions from the template)."""
    ids = scaffold.token_ids.copy()
    for p in range(len(ids)):
        if scaffold.frozen[p]:
            continue
        cls = constraints.class_at(ids, p)
        allowed = np.flatnonzero(constraints.table[cls])
        ids[p] = rng.choice(allowed)
    return ids


@pytest.fixture(scope="module")
def codec() -> QwenLikeCodec:
    return QwenLikeCodec()


@pytest.mark.parametrize("kind", [FixedNumber(2, 2), FixedNumber(1, 0), FixedNumber(3, 1)])
def test_number_slot_spells_only_its_format(codec: QwenLikeCodec, kind: FixedNumber) -> None:
    scaffold = build_scaffold(_Schema(kind), codec)  # type: ignore[arg-type]
    constraints = build_constraints(scaffold, codec.vocab_size + 5)  # model vocabulary padded past the tokenizer
    span = scaffold.slots[0]
    assert not constraints.table[1:, codec.vocab_size:].any()  # padded ids never allowed in a slot
    multi = 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = random_fill(scaffold, constraints, rng)
        value = scaffold.decode_sections(ids)["value"]
        assert isinstance(value, float) and abs(value) <= kind.max_abs
        slot = ids[span.start: span.end]
        nulls = np.flatnonzero(slot == codec.special.null)
        # the filler only once the number is complete, and then only the filler
        assert nulls.size == 0 or (slot[nulls[0]:] == codec.special.null).all()
        assert len(codec.decode([t for t in slot if t != codec.special.null])) == kind.width
        multi += any(len(codec.texts[t]) > 1 for t in slot if t != codec.special.null)
    assert multi > 0  # multi-character tokens ("+0", "12", ".5") were used


def test_enum_slot_admits_only_its_options(codec: QwenLikeCodec) -> None:
    kind = Categorical(("left", "left_turn", "right", "stop", "slow"))
    scaffold = build_scaffold(_Schema(kind), codec)  # type: ignore[arg-type]
    constraints = build_constraints(scaffold, codec.vocab_size)
    seen = set()
    rng = np.random.default_rng(1)
    for _ in range(300):
        seen.add(scaffold.decode_sections(random_fill(scaffold, constraints, rng))["value"])
    assert seen == set(kind.options)
    first = constraints.class_at(scaffold.token_ids, scaffold.slots[0].start)
    assert set(np.flatnonzero(constraints.table[first])) == {codec.encode(o)[0] for o in kind.options}


def test_free_text_never_ends_the_string_early(codec: QwenLikeCodec) -> None:
    kind = FreeText(12)
    scaffold = build_scaffold(_Schema(kind), codec)  # type: ignore[arg-type]
    constraints = build_constraints(scaffold, codec.vocab_size)
    cls = constraints.class_at(scaffold.token_ids, scaffold.slots[0].start)
    allowed = {codec.texts[t] for t in np.flatnonzero(constraints.table[cls])}
    assert not any('"' in t or "\\" in t for t in allowed)
    assert "\x01" not in allowed and "<|im_start|>" not in allowed and "<|mask|>" not in allowed
    assert "<|null|>" in allowed and " the" in allowed
    rng = np.random.default_rng(2)
    for _ in range(200):
        text = scaffold.decode_sections(random_fill(scaffold, constraints, rng))["value"]
        assert isinstance(text, str) and '"' not in text


@pytest.mark.parametrize("schema", [DrivingSchema.nuscenes(), DrivingSchema.wod_e2e(), RobotActionSchema()])
def test_any_allowed_answer_parses(shipped: tuple[Any, Any], schema: Any) -> None:
    """Every answer the masks allow parses, on the reference tokenizer, for each preset schema."""
    model, tokenizer = shipped
    scaffold = build_scaffold(schema, tokenizer)
    constraints = build_constraints(scaffold, model.config.lm.vocab_size)
    assert constraints.num_classes < 64 and constraints.table[0].all()
    rng = np.random.default_rng(3)
    for _ in range(40):
        scaffold.decode_plan(random_fill(scaffold, constraints, rng))


def test_classes_follow_the_tokens_before_each_position(shipped: tuple[Any, Any]) -> None:
    model, tokenizer = shipped
    scaffold = build_scaffold(DrivingSchema.nuscenes(), tokenizer)
    constraints = build_constraints(scaffold, model.config.lm.vocab_size)
    ids = random_fill(scaffold, constraints, np.random.default_rng(4))
    batch = constraints.classes_after(np.stack([ids, ids]), 10)
    single = [constraints.class_at(ids, j + 1) for j in range(10, len(ids))]
    assert batch.shape == (2, len(ids) - 10) and (batch == np.array(single)).all()
    assert batch[0, -1] == 0  # past the answer: unconstrained
    span = scaffold.slot("trajectory.0.0")
    sign = constraints.class_at(ids, span.start)
    digit = constraints.class_at(ids, span.start + 1)
    letter = tokenizer.encode("a")[0]
    assert not constraints.allows(sign, letter) and not constraints.allows(digit, letter)
    plus = tokenizer.encode("+")[0]
    assert constraints.allows(sign, plus) and not constraints.allows(digit, plus)


def test_unconstrainable_slot_is_refused() -> None:
    codec = QwenLikeCodec()
    scaffold = build_scaffold(_Schema(FixedNumber(2, 2)), codec)  # type: ignore[arg-type]
    for text in (".", ".5", "5."):  # afterwards no token spells the decimal point any more
        codec.texts[codec.texts.index(text)] = "q" + text
    with pytest.raises(ConstraintError, match=r"value: no token of the tokenizer spells character 3"):
        build_constraints(scaffold, codec.vocab_size)


def test_allowed_tokens_check_names_the_mismatch() -> None:
    table = np.ones((3, 10), dtype=np.bool_)
    with pytest.raises(ValueError, match=r"classes must have shape \(1, 4\)"):
        AllowedTokens(table, np.zeros((1, 3), np.int64)).check(1, 4, 10)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        AllowedTokens(table, np.full((1, 4), 3, np.int64)).check(1, 4, 10)
    with pytest.raises(ValueError, match=r"bool \(C, 12\)"):
        AllowedTokens(table, np.zeros((1, 4), np.int64)).check(1, 4, 12)


def test_torch_backend_masks_before_top1_and_probability(shipped: tuple[Any, Any]) -> None:
    import torch

    from blockpilot.runtime.torch_backend import TorchBackend

    model, tokenizer = shipped
    vocab = model.config.lm.vocab_size
    backend = TorchBackend(model, 128)
    prompt = Prompt(np.array(tokenizer.encode("drive to the left lane"), dtype=np.int64))
    backend.prefill(prompt)
    free = backend.step(prompt.token_ids[None, -3:], len(prompt) - 3, mode="causal", write_kv=False)  # type: ignore[arg-type]
    table = np.ones((2, vocab), dtype=np.bool_)
    allowed_ids = [t for t in range(5, 40) if t not in free.top1[0]]
    table[1] = False
    table[1, allowed_ids] = True
    classes = np.array([[0, 1, 1]], dtype=np.int64)
    got = backend.step(prompt.token_ids[None, -3:], len(prompt) - 3, mode="causal", write_kv=False,  # type: ignore[arg-type]
                       allowed=AllowedTokens(table, classes))
    assert got.top1[0, 0] == free.top1[0, 0] and got.prob[0, 0] == pytest.approx(free.prob[0, 0])
    assert set(got.top1[0, 1:]) <= set(allowed_ids)
    # the probability is the constrained softmax's: the allowed tokens' mass renormalised
    with torch.inference_mode():
        backend.prefill(Prompt(prompt.token_ids[:-1]))
        full = backend.step(prompt.token_ids[None, -2:-1], len(prompt) - 2, mode="causal", write_kv=False,  # type: ignore[arg-type]
                            allowed=AllowedTokens(table, np.array([[1]])))
    assert got.top1[0, 1] == full.top1[0, 0] and full.prob[0, 0] > free.prob[0, 1] * 0


def test_scaffold_equals_ar_with_typed_slots_on_torch(shipped: tuple[Any, Any]) -> None:
    from blockpilot.runtime.torch_backend import TorchBackend

    model, tokenizer = shipped
    scaffold = build_scaffold(DrivingSchema.nuscenes(), tokenizer)
    constraints = build_constraints(scaffold, model.config.lm.vocab_size)
    prompt = image_prompt(tokenizer)
    backend = TorchBackend(model, len(prompt) + len(scaffold) + 64)
    with torch_threads(1):
        ar = ar_greedy(backend, prompt, max_new_tokens=len(scaffold), end_id=tokenizer.special.end,
                       scaffold=scaffold, constraints=constraints)
        spec = scaffold_speculative(backend, prompt, scaffold, SpeculativeOptions(mask_id=tokenizer.special.mask),
                                    constraints)
    assert np.array_equal(ar.tokens, spec.tokens)
    assert spec.forwards < ar.forwards
    scaffold.decode_plan(spec.tokens[0])


def _observation() -> Any:
    from blockpilot.eval.synthetic import heldout_keyframes, observation

    return observation(heldout_keyframes(1, stride=8)[0])


def test_letter_biased_model_still_plans(shipped: tuple[Any, Any]) -> None:
    """Adversarial: a model pushed to write a letter everywhere loses the plan unconstrained, never with typed slots."""
    import copy

    import torch

    from blockpilot.runtime.plan_types import DecoderSettings
    from blockpilot.runtime.planner import Planner

    model, tokenizer = shipped
    biased = copy.deepcopy(model)
    letter = tokenizer.encode("a")[0]
    plain = biased.logits

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = plain(hidden)
        out[..., letter] += 1e3
        return out

    biased.logits = logits  # type: ignore[method-assign]
    planner = Planner.from_model(biased, tokenizer, decoder=DecoderSettings(name="scaffold"), max_prompt_tokens=200)
    observation = _observation()
    with torch_threads(1):
        typed = planner.plan(observation)
        assert typed.ok and typed.stats.constrained
        planner.constraints = None
        free = planner.plan(observation)
    assert not free.ok and not free.stats.constrained


@pytest.fixture(scope="module")
def onnx_export(shipped: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from blockpilot.export.onnx_graphs import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(shipped[0], out, 400)
    return out


def test_ort_graph_applies_the_mask_like_torch(shipped: tuple[Any, Any], onnx_export: Any) -> None:
    from blockpilot.runtime.ort_backend import OrtBackend
    from blockpilot.runtime.torch_backend import TorchBackend

    model, tokenizer = shipped
    vocab = model.config.lm.vocab_size
    prompt = Prompt(np.array(tokenizer.encode("keep the lane and slow down"), dtype=np.int64))
    table = np.ones((3, vocab), dtype=np.bool_)
    table[1] = False
    table[1, 100:140] = True
    table[2] = False
    table[2, [7, 9]] = True
    classes = np.array([[2, 0, 1, 1]], dtype=np.int64)
    results = []
    for backend in (TorchBackend(model, 400), OrtBackend(onnx_export)):
        backend.prefill(Prompt(prompt.token_ids[:-4]))
        results.append(backend.step(prompt.token_ids[None, -4:], len(prompt) - 4, mode="causal",  # type: ignore[arg-type]
                                    write_kv=True, allowed=AllowedTokens(table, classes)))
    ours, ort = results
    assert np.array_equal(ours.top1, ort.top1) and np.allclose(ours.prob, ort.prob, atol=1e-4)
    assert ort.top1[0, 0] in (7, 9) and all(100 <= t < 140 for t in ort.top1[0, 2:])


def test_scaffold_equals_ar_on_ort_and_old_exports_run_unconstrained(onnx_export: Any) -> None:
    import json

    from blockpilot.demo import SHIPPED_MODEL
    from blockpilot.runtime.ort_backend import ort_planner
    from blockpilot.runtime.plan_types import DecoderSettings

    observation = _observation()
    plans = {name: ort_planner(SHIPPED_MODEL, onnx_export, decoder=DecoderSettings(name=name)).plan(observation)
             for name in ("scaffold", "ar")}
    assert plans["scaffold"].stats.constrained and plans["ar"].stats.constrained
    assert np.array_equal(plans["scaffold"].tokens, plans["ar"].tokens) and plans["scaffold"].ok
    # An export made before typed slots: its spec lists no allowed_table / token_class inputs.
    spec_file = onnx_export / "onnx_spec.json"
    spec = json.loads(spec_file.read_text())
    spec["lm_step"]["inputs"] = [i for i in spec["lm_step"]["inputs"] if "default" not in i]
    spec_file.write_text(json.dumps(spec))
    old = ort_planner(SHIPPED_MODEL, onnx_export, decoder=DecoderSettings(name="scaffold"))
    assert old.constraints is None and not old.plan(observation).stats.constrained


def test_cuda_backend_masks_like_torch(shipped: tuple[Any, Any]) -> None:
    """The cuda backend (here on the CPU with its reference epilogue) applies the same mask, sampled draws too."""
    from blockpilot.runtime.backend import Sampling
    from blockpilot.runtime.cuda_backend import CudaBackend
    from blockpilot.runtime.torch_backend import TorchBackend

    model, tokenizer = shipped
    vocab = model.config.lm.vocab_size
    prompt = Prompt(np.array(tokenizer.encode("keep the lane and slow down"), dtype=np.int64))
    table = np.ones((2, vocab), dtype=np.bool_)
    table[1] = False
    table[1, 200:230] = True
    classes = np.array([[1, 0, 1]] * 2, dtype=np.int64)
    results = []
    with torch_threads(1):
        for backend in (TorchBackend(model, 128, max_batch=2), CudaBackend(model, 128, max_batch=2, device="cpu")):
            backend.prefill(Prompt(prompt.token_ids[:-3]))
            backend.fork(2)
            results.append(backend.step(np.repeat(prompt.token_ids[None, -3:], 2, 0), len(prompt) - 3,
                                        mode="causal", write_kv=True, sampling=Sampling(0.7, (1, 2)),  # type: ignore[arg-type]
                                        allowed=AllowedTokens(table, classes)))
    ours, cuda = results
    assert np.array_equal(ours.top1, cuda.top1) and np.allclose(ours.prob, cuda.prob, atol=1e-5)
    assert ours.sampled is not None and cuda.sampled is not None and np.array_equal(ours.sampled, cuda.sampled)
    assert all(200 <= t < 230 for t in cuda.sampled[:, [0, 2]].ravel())


def _enumerate_numbers(kind: FixedNumber, codec: QwenLikeCodec) -> set[str]:
    """Every slot text the automaton admits, by walking all allowed tokens (the filler ends a text)."""
    scaffold = build_scaffold(_Schema(kind), codec)  # type: ignore[arg-type]
    constraints = build_constraints(scaffold, codec.vocab_size)
    span = scaffold.slots[0]
    found: set[str] = set()

    def walk(ids: np.ndarray, p: int) -> None:
        if p == span.end or (p > span.start and ids[p - 1] == codec.special.null):
            found.add(codec.decode([int(t) for t in ids[span.start: p] if t != codec.special.null]))
            return
        for tok in np.flatnonzero(constraints.table[constraints.class_at(ids, p)]):
            nxt = ids.copy()
            nxt[p] = tok
            walk(nxt, p + 1)

    walk(scaffold.token_ids.copy(), span.start)
    return found


@pytest.mark.parametrize(("bounds", "frac"), [
    ({"minimum": -1.0, "maximum": 1.0}, 2),
    ({"minimum": 0.25, "maximum": 3.5}, 1),
    ({"minimum": -3.0, "maximum": -0.5, "exclusive_maximum": True}, 1),
    ({"minimum": -2.0, "maximum": 2.0, "exclusive_minimum": True, "exclusive_maximum": True}, 0),
])
def test_bounded_numbers_admit_exactly_the_values_in_range(bounds: dict[str, Any], frac: int) -> None:
    from blockpilot.vla.json_parts import BoundedNumber

    kind = BoundedNumber(1, frac, integer=frac == 0, **bounds)
    admitted = _enumerate_numbers(kind, QwenLikeCodec())
    step = 10.0 ** -frac
    values = [round(i * step, frac) for i in range(-int(9.99 / step) - 1, int(9.99 / step) + 2)]
    in_range = {kind.format_value(v, "v") for v in values if abs(v) <= kind.max_abs and not kind.out_of_range(v)}
    # Every value in range can be written, and everything the automaton admits parses inside the range
    # (zero may also be spelled with a minus sign, which parses to -0.0, in range where zero is).
    assert in_range <= admitted
    for text in admitted:
        assert not kind.out_of_range(float(kind.parse_value(text)))  # type: ignore[arg-type]


def test_a_number_range_no_value_fits_is_refused() -> None:
    from blockpilot.vla.json_parts import BoundedNumber

    with pytest.raises(ConstraintError, match="range"):
        _enumerate_numbers(BoundedNumber(1, 1, minimum=0.01, maximum=0.04), QwenLikeCodec())


def test_bounded_text_keeps_to_its_character_budget() -> None:
    from blockpilot.vla.json_parts import BoundedText

    codec = QwenLikeCodec()
    kind = BoundedText(max_tokens=6, min_length=2, max_length=4)
    scaffold = build_scaffold(_Schema(kind), codec)  # type: ignore[arg-type]
    constraints = build_constraints(scaffold, codec.vocab_size)
    rng = np.random.default_rng(0)
    span = scaffold.slots[0]
    for _ in range(300):
        ids = random_fill(scaffold, constraints, rng)
        text = scaffold.read_slots(ids)[span.path]
        assert 2 <= len(text) <= 4, text
        assert scaffold.decode_sections(ids)["value"] == text
