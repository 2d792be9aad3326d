"""Checkpoints in the published Fast-dLLM v2 / Fast-dVLM / Fast-dDrive layouts, without blockpilot.json,
through config, tokenizer, logits and every command (the full command runs on three of the four layouts are
marked extended, scaffold == ar on torch on three of them slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from published_layouts import ADDED_TOKENS, ENDOFTEXT_ID, IM_END_ID, LAYOUTS, MASK_ID, Layout, build_layouts
from sim_writer_fixtures import make_scene

from blockpilot.cli import main
from blockpilot.demo import road_image
from blockpilot.runtime.plan_types import DecoderSettings, Observation
from blockpilot.runtime.planner import Planner
from blockpilot.vla.config import ConfigError
from blockpilot.vla.hf_config import load_config
from blockpilot.vla.loader import load_model, load_tokenizer
from blockpilot.vla.prompt import EgoState
from blockpilot.vla.tokenizer import Tokenizer, TokenizerError
from blockpilot.vla.vision import image_inputs

EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'
TEXTS = ('{"trajectory":[[+14.70,-00.04],[+29.41,-00.10]]}', "The ego vehicle should slow down because a cyclist",
         "<|im_start|>user\nEgo speed 08.40 m/s<|im_end|>\n", "|<MASK>||<MASK>|x<|endoftext|>y", "naïve café 123\t\n ",
         "Ünïcödé e\u0301 \u4f60\u597d  ")


@pytest.fixture(scope="session")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Layout]:
    return build_layouts(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="session")
def nuscenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    # The default camera and renderer: the frame size a bundle's vision graph is exported for today.
    return write_nuscenes([make_scene(7, 0.0, "go straight")], tmp_path_factory.mktemp("nus") / "root")


@pytest.mark.parametrize("name", LAYOUTS)
def test_published_config_resolves_mask_filler_and_sub_block(layouts: dict[str, Layout], name: str) -> None:
    path = layouts[name].path
    hf = json.loads((path / "config.json").read_text())
    assert "mask_token_id" not in hf and "sub_block_size" not in hf and "null_token_id" not in hf
    assert not (path / "blockpilot.json").exists()
    config = load_config(path)
    assert (config.tokens.mask, config.tokens.null, config.tokens.end) == (MASK_ID, ENDOFTEXT_ID, IM_END_ID)
    assert (config.diffusion.block_size, config.diffusion.sub_block_size) == (32, 8)
    assert config.lm.vocab_size == 151936
    assert config.lm.tie_word_embeddings == (name != "llm_7b")
    assert config.architecture == ("qwen2" if name.startswith("llm") else "qwen2_5_vl")
    if config.vision is not None:
        assert (config.tokens.image, config.tokens.vision_start, config.tokens.vision_end) == (151655, 151652, 151653)
    tok = load_tokenizer(path, config)
    assert tok.vocab_size == MASK_ID + 1 and tok.token_text(config.tokens.null) == "<|endoftext|>"


def test_mask_falls_back_to_config_and_refuses_a_tokenizer_without_it(layouts: dict[str, Layout],
                                                                     tmp_path: Path) -> None:
    src = layouts["llm_7b"].path
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(src / f, tmp_path / f)
    added = {t: i for i, t, _ in ADDED_TOKENS if t != "|<MASK>|"}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(ConfigError, match=r"mask_token_id.*added_tokens\.json.*\|<MASK>\|"):
        load_config(tmp_path)
    # A config that names the mask wins over the tokenizer (here: another added special token).
    hf = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "mask_token_id": 151654}))
    assert load_config(tmp_path).tokens.mask == 151654
    # Base models end with <|endoftext|>: the filler moves to <|fim_pad|>, never onto the end token.
    (tmp_path / "config.json").write_text(json.dumps({**hf, "mask_token_id": 151654, "eos_token_id": ENDOFTEXT_ID}))
    assert load_config(tmp_path).tokens.null == 151662


def _transformers_tokenizer(path: Path) -> Any:
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def tokenizers_pair(layouts: dict[str, Layout]) -> tuple[Tokenizer, Tokenizer, Any, Any]:
    json_dir, files_dir = layouts["llm_1p5b"].path, layouts["llm_7b"].path
    assert (json_dir / "tokenizer.json").is_file() and not (files_dir / "tokenizer.json").exists()
    return (load_tokenizer(json_dir, load_config(json_dir)), load_tokenizer(files_dir, load_config(files_dir)),
            _transformers_tokenizer(json_dir), _transformers_tokenizer(files_dir))


def _same_ids(pair: tuple[Tokenizer, Tokenizer, Any, Any], text: str) -> None:
    ours_json, ours_files, theirs_json, theirs_files = pair
    ids = ours_json.encode(text)
    assert ours_files.encode(text) == ids
    assert theirs_json.encode(text, add_special_tokens=False) == ids
    assert theirs_files.encode(text, add_special_tokens=False) == ids
    assert ours_files.decode(ids) == ours_json.decode(ids)


def test_vocab_merges_files_give_the_ids_of_tokenizer_json_and_transformers(tokenizers_pair: Any) -> None:
    for text in TEXTS:
        _same_ids(tokenizers_pair, text)
    ours_files = tokenizers_pair[1]
    assert ours_files.source.endswith("vocab.json")
    for tid, text, special in ADDED_TOKENS:
        assert ours_files.encode(text) == [tid] and (tid in ours_files.special_ids) == special


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 .,:-+[]{}\"'\n\téü你|<>MASK")), max_size=40))
def test_vocab_merges_ids_on_generated_text(tokenizers_pair: Any, text: str) -> None:
    _same_ids(tokenizers_pair, text)


def test_bpe_files_errors_name_the_file(layouts: dict[str, Layout], tmp_path: Path) -> None:
    src = layouts["llm_7b"].path
    special = load_config(src).tokens
    shutil.copy(src / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match=r"merges\.txt: missing"):
        Tokenizer.from_file(tmp_path, special)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nzzq zzr\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt: line 2"):
        Tokenizer.from_file(tmp_path, special)
    shutil.copy(src / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 151650}))
    with pytest.raises(TokenizerError, match="without gaps"):
        Tokenizer.from_file(tmp_path, special)


@pytest.mark.parametrize("name", LAYOUTS)
def test_logits_match_transformers(layouts: dict[str, Layout], name: str) -> None:
    layout = layouts[name]
    ours = load_model(layout.path)
    ids = [151644, 8, 9, 10, 11, 151645, 12]
    kwargs: dict[str, Any] = {}
    if ours.config.vision is not None:
        pixels, grid = image_inputs([road_image(56)], ours.config.vision)
        n = int(grid.prod()) // 4
        ids = [*ids[:3], 151652, *[151655] * n, 151653, *ids[3:]]
        kwargs = {"pixel_values": pixels, "image_grid_thw": grid}
    tokens = torch.tensor([ids])
    with torch.no_grad():
        if kwargs:
            got = ours.logits(ours(tokens, pixel_values=kwargs["pixel_values"], grid_thw=kwargs["image_grid_thw"]))
            expected = layout.hf(input_ids=tokens, **kwargs, mm_token_type_ids=(tokens == 151655).int()).logits
        else:
            got = ours.logits(ours(tokens))
            expected = layout.hf(input_ids=tokens).logits
    scale = float(expected.abs().max())
    assert scale > 1.0
    # fp32 rounding grows with the logits' size (random weights drawn large so a wiring error shows).
    torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=0)


def _observation(vision: bool) -> Observation:
    ego = EgoState(np.array([[-7.5, 0.0], [-5.0, 0.0], [-2.5, 0.0], [0.0, 0.0]]), speed_mps=5.0, accel_mps2=0.0)
    return Observation([road_image(112)] if vision else [], ego, "go straight")


# The AR baseline runs ~150 forwards over a 151,936-row head: 15-25 s a layout here. The default run checks a vision
# layout (the text-only path is checked on the bundle by test_every_command_on_the_layout); `-m slow` the others.
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "vlm_v5" else pytest.mark.slow) for n in LAYOUTS])
def test_scaffold_equals_ar_on_torch_without_blockpilot_json(layouts: dict[str, Layout], name: str) -> None:
    path = layouts[name].path
    model, tokenizer = load_model(path), load_tokenizer(path, load_config(path))
    obs = _observation(model.config.vision is not None)
    plans = {d: Planner.from_model(model, tokenizer, decoder=DecoderSettings(name=d)).plan(obs)
             for d in ("scaffold", "ar")}
    np.testing.assert_array_equal(plans["scaffold"].tokens, plans["ar"].tokens)
    assert plans["scaffold"].stats.forwards < plans["ar"].stats.forwards


def test_plan_cli_text_only_and_vision_models(layouts: dict[str, Layout], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    image = tmp_path / "front.png"
    Image.fromarray(road_image(112)).save(image)
    text_only, vl = str(layouts["llm_1p5b"].path), str(layouts["vlm_v5"].path)
    rc = main(["plan", "--checkpoint", text_only, "--ego", EGO])
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert plan["stats"]["image_tokens"] == 0 and plan["stats"]["prompt_tokens"] > 0
    # Random weights: an unparsed answer exits 3 with the error, a parsed one 0.
    assert rc == (0 if plan["parse_error"] is None else 3)
    assert (plan["parse_error"] is None) == ("did not parse" not in err)
    assert main(["plan", "--checkpoint", text_only, "--ego", EGO, "--image", str(image)]) == 2
    assert "text-only model" in capsys.readouterr().err
    assert main(["plan", "--checkpoint", vl, "--ego", EGO]) == 2
    assert "--image is required" in capsys.readouterr().err


def test_plan_cli_short_ego_history_is_an_error(layouts: dict[str, Layout], capsys: pytest.CaptureFixture[str]) -> None:
    short = '{"past": [[-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'
    assert main(["plan", "--checkpoint", str(layouts["llm_1p5b"].path), "--ego", short]) == 2
    err = capsys.readouterr().err
    assert "needs 4 past positions" in err and "-2.0 s, -1.5 s" in err and "missing" in err


def test_schema_option_refuses_unknown_names(layouts: dict[str, Layout], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--checkpoint", str(layouts["llm_1p5b"].path), "--ego", EGO, "--schema", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err


# One layout (sharded bf16 weights, vocab.json + merges.txt tokenizer) runs in the default suite; all four run
# with `bash scripts/test.sh -m extended` (each takes minutes on a 2-core CPU).
EVERY_COMMAND_LAYOUTS = [pytest.param(n, marks=() if n == "llm_7b" else pytest.mark.extended) for n in LAYOUTS]


@pytest.mark.parametrize("name", EVERY_COMMAND_LAYOUTS)
def test_every_command_on_the_layout(layouts: dict[str, Layout], nuscenes_root: Path, tmp_path: Path, name: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(layouts[name].path)
    assert main(["inspect", ckpt]) == 0
    assert "151665" in capsys.readouterr().out
    run = tmp_path / "eval"
    assert main(["eval", "--source", "nuscenes", "--dataroot", str(nuscenes_root), "--checkpoint", ckpt,
                 "--out", str(run), "--limit", "6", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert any(r.get("status") in ("ok", "parse_error") for r in records)
    assert main(["quantize", "--checkpoint", ckpt, "--recipe", "fp8", "--calib", "2", "--calib-scenes", "1",
                 "--out", str(tmp_path / "quant"), "--cache-dir", str(tmp_path / "cache")]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint", ckpt, "--out", str(bundle), "--quiet"]) == 0
    assert json.loads((bundle / "model" / "blockpilot.json").read_text())["schema"]["kind"] == "driving"
    assert main(["verify", str(bundle), "--checkpoint", ckpt, "--samples", "1", "--backend", "onnxruntime"]) == 0
    assert main(["eval", "--source", "nuscenes", "--dataroot", str(nuscenes_root), "--bundle", str(bundle),
                 "--out", str(tmp_path / "eval_bundle"), "--limit", "6", "--no-progress"]) == 0
    if name.startswith("vlm"):
        from PIL import Image

        Image.fromarray(road_image(112)).save(image := tmp_path / "front.png")
        capsys.readouterr()
        assert main(["plan", "--checkpoint", ckpt, "--ego", EGO, "--image", str(image), "--schema",
                     "driving-wod"]) in (0, 3)
        assert json.loads(capsys.readouterr().out)["stats"]["image_tokens"] == 16
    from blockpilot.runtime.bundle_planner import planner_from_bundle

    obs = _observation(name.startswith("vlm"))
    scaffold = planner_from_bundle(bundle, decoder=DecoderSettings(name="scaffold")).plan(obs)
    ar = planner_from_bundle(bundle, decoder=DecoderSettings(name="ar")).plan(obs)
    np.testing.assert_array_equal(scaffold.tokens, ar.tokens)


def test_export_refuses_a_bad_schema_before_any_onnx_work(layouts: dict[str, Layout], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(layouts["llm_1p5b"].path)
    assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "b"), "--schema", "robot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "RobotActionSchema" in err and "writer already closed" not in err
    assert not (tmp_path / "b").exists()
