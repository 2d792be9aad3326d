"""Quantization recipes (modelopt list-form configs, precision maps) and per-target precision gates."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modelopt.torch.quantization as mtq
import pytest
import torch

from blockpilot.quant.recipes import (
    AUTO,
    FORMATS,
    PROTECTED,
    RECIPES,
    Recipe,
    RecipeError,
    Rule,
    quantizable_modules,
    resolve_recipe,
)
from blockpilot.quant.targets import TARGETS, PrecisionNotSupportedError, TargetError, check_recipe, resolve_target
from blockpilot.vla.loader import load_model
from blockpilot.vla.model import VLAModel

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "reference"
PRESETS = ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "W4A8_NVFP4_FP8_CFG", "INT8_SMOOTHQUANT_CFG", "FP8_KV_CFG")
FIXED = [name for name in RECIPES if name != "auto"]


@pytest.fixture(scope="module")
def names() -> list[str]:
    return quantizable_modules(load_model(SHIPPED))


@pytest.fixture(scope="module", autouse=True)
def presets_untouched() -> Iterator[None]:
    """Nothing in this module may change modelopt's preset constants."""
    before = {name: copy.deepcopy(getattr(mtq, name)) for name in PRESETS}
    yield
    assert {name: getattr(mtq, name) for name in PRESETS} == before


def _entries(config: dict[str, Any], suffix: str) -> dict[str, dict[str, Any]]:
    return {e["quantizer_name"]: e for e in config["quant_cfg"] if e["quantizer_name"].endswith(suffix)}


def _preset_cfg(preset: str, quantizer: str) -> dict[str, Any]:
    return next(e["cfg"] for e in getattr(mtq, preset)["quant_cfg"] if e["quantizer_name"] == quantizer)


def test_quantizable_modules_are_the_linear_and_conv_layers(names: list[str]) -> None:
    assert "lm.layers.0.self_attn.q_proj" in names and "visual.patch_embed.proj" in names
    assert "lm.lm_head" in names and "visual.merger.mlp.2" in names
    assert "lm.embed_tokens" not in names and not any("norm" in n for n in names)


@pytest.mark.parametrize("name", FIXED)
def test_every_fixed_recipe_is_a_valid_list_form_config(name: str, names: list[str]) -> None:
    recipe = resolve_recipe(name, kv_cache="fp8", first_last_layers="none")
    config = recipe.modelopt_config(names)
    mtq.config.QuantizeConfig(**config)  # modelopt's own validation of the list form
    assert config["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    assert config["algorithm"] == ("smoothquant" if name == "int8_sq" else "max")
    # the protected modules come last among the rules, so nothing overrides them
    for pattern in PROTECTED:
        assert _entries(config, ".weight_quantizer")[f"{pattern}.weight_quantizer"] == {
            "quantizer_name": f"{pattern}.weight_quantizer", "enable": False}
    assert "lm.layers.3.*.weight_quantizer" in _entries(config, ".weight_quantizer")  # {last} resolved
    kv = _entries(config, ".output_quantizer")
    assert set(kv) == {"*.k_proj.output_quantizer", "*.v_proj.output_quantizer"}
    assert all(e["cfg"] == _preset_cfg("FP8_KV_CFG", "*[kv]_bmm_quantizer") for e in kv.values())
    assert json.loads(json.dumps(config))  # plain data


def test_nvfp4_config_takes_modelopts_cfgs() -> None:
    config = resolve_recipe("nvfp4").modelopt_config()
    weights = _entries(config, ".weight_quantizer")
    lm = weights["lm.layers.*.weight_quantizer"]["cfg"]
    assert lm == _preset_cfg("NVFP4_DEFAULT_CFG", "*weight_quantizer")
    assert lm["num_bits"] == (2, 1) and lm["block_sizes"] == {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
    assert _entries(config, ".input_quantizer")["lm.layers.*.input_quantizer"]["cfg"]["num_bits"] == (2, 1)
    assert weights["visual.*.weight_quantizer"]["cfg"] == {"num_bits": (4, 3), "axis": None}  # vision stays fp8
    mtq.config.QuantizeConfig(**config)


def test_format_cfgs_follow_the_presets() -> None:
    assert FORMATS["fp8"].weight_cfg == FORMATS["fp8"].input_cfg == {"num_bits": (4, 3), "axis": None}
    assert FORMATS["w4a8"].weight_cfg == _preset_cfg("W4A8_NVFP4_FP8_CFG", "*weight_quantizer")
    assert FORMATS["w4a8"].input_cfg == {"num_bits": (4, 3), "axis": None}
    assert FORMATS["int8_sq"].weight_cfg == {"num_bits": 8, "axis": 0}
    assert FORMATS["none"].weight_cfg is None
    for fmt in FORMATS.values():  # effective bits agree with the preset's weight cfg
        cfg = fmt.weight_cfg
        if cfg is None:
            assert fmt.effective_bits == 16
            continue
        bits = cfg["num_bits"]
        element = bits if isinstance(bits, int) else 1 + sum(bits)
        blocks = cfg.get("block_sizes")
        scale = 0.0 if not blocks else (1 + sum(blocks["scale_bits"])) / blocks[-1]
        assert fmt.effective_bits == element + scale, fmt.name
    FORMATS["fp8"].weight_cfg["num_bits"] = 8  # a copy: the preset stays as it is (checked at module end)


def test_fp8_recipe_quantizes_the_reference_model() -> None:
    model = load_model(SHIPPED)
    recipe = resolve_recipe("fp8", kv_cache="fp8")
    config = recipe.modelopt_config(model)
    gen = torch.Generator().manual_seed(0)

    def forward_loop(m: VLAModel) -> None:
        m.lm(input_ids=torch.randint(0, 700, (1, 16), generator=gen))

    mtq.quantize(model, config, forward_loop)
    quantizers: dict[str, Any] = {n: m for n, m in model.named_modules() if n.endswith("_quantizer")}
    q = "lm.layers.0.self_attn.q_proj"
    for kind in ("weight", "input"):
        assert quantizers[f"{q}.{kind}_quantizer"].is_enabled
        assert quantizers[f"{q}.{kind}_quantizer"].num_bits == (4, 3)
    assert quantizers[f"{q}.input_quantizer"].amax is not None  # calibrated by the loop
    assert not quantizers[f"{q}.output_quantizer"].is_enabled
    kv = quantizers["lm.layers.2.self_attn.k_proj.output_quantizer"]
    assert kv.is_enabled and kv.num_bits == (4, 3)
    for off in ("lm.lm_head", "visual.patch_embed.proj"):
        assert not any(quantizers[f"{off}.{kind}_quantizer"].is_enabled for kind in ("weight", "input"))
    assert not any(q.is_enabled for n, q in quantizers.items() if n.startswith("lm.embed_tokens."))
    # modelopt's pattern matching on quantizer names agrees with the planned precision map
    plan = recipe.assign(model)
    assert {n for n, fmt in plan.items() if fmt != "none"} == {
        n.removesuffix(".weight_quantizer") for n, q in quantizers.items()
        if n.endswith(".weight_quantizer") and q.is_enabled}


def test_mixed_assigns_attention_fp8_mlp_nvfp4(names: list[str]) -> None:
    plan = resolve_recipe("mixed").assign(names)
    assert set(plan) == set(names)
    assert plan["lm.layers.1.self_attn.q_proj"] == plan["lm.layers.3.self_attn.o_proj"] == "fp8"
    assert plan["lm.layers.0.mlp.gate_proj"] == plan["lm.layers.2.mlp.down_proj"] == "nvfp4"
    assert plan["visual.blocks.0.attn.qkv"] == plan["visual.merger.mlp.0"] == "fp8"
    assert plan["lm.lm_head"] == plan["visual.patch_embed.proj"] == "none"
    assert resolve_recipe("mixed", vision="none").assign(names)["visual.blocks.1.mlp.up_proj"] == "none"


def test_first_last_layers_override_the_first_and_last_decoder_layer(names: list[str]) -> None:
    plan = resolve_recipe("mixed", first_last_layers="none").assign(names)
    for layer in (0, 3):
        assert plan[f"lm.layers.{layer}.self_attn.q_proj"] == plan[f"lm.layers.{layer}.mlp.up_proj"] == "none"
    assert plan["lm.layers.1.mlp.up_proj"] == "nvfp4" and plan["lm.layers.2.self_attn.k_proj"] == "fp8"
    deeper = [n.replace("layers.3.", "layers.27.") for n in names]  # {last} follows the model's depth
    assert resolve_recipe("nvfp4", first_last_layers="fp8").assign(deeper)["lm.layers.27.mlp.up_proj"] == "fp8"
    with pytest.raises(RecipeError, match="last layer"):
        resolve_recipe("mixed", first_last_layers="fp8").modelopt_config()


def test_plain_recipes_vision_defaults(names: list[str]) -> None:
    vision = {n: resolve_recipe(n).assign(names)["visual.blocks.2.mlp.down_proj"] for n in FIXED if n != "mixed"}
    assert vision == {"fp8": "fp8", "nvfp4": "fp8", "w4a8": "fp8", "int8_sq": "int8_sq"}
    assert resolve_recipe("nvfp4", vision="nvfp4").assign(names)["visual.blocks.2.mlp.down_proj"] == "nvfp4"
    assert resolve_recipe("w4a8").assign(names)["lm.layers.2.mlp.down_proj"] == "w4a8"


def test_kv_cache_adds_k_and_v_output_quantizers() -> None:
    assert _entries(resolve_recipe("mixed").modelopt_config(), ".output_quantizer") == {}
    recipe = resolve_recipe("mixed", kv_cache="fp8")
    assert set(_entries(recipe.modelopt_config(), ".output_quantizer")) == {
        "*.k_proj.output_quantizer", "*.v_proj.output_quantizer"}
    assert recipe.formats_used == ("fp8", "nvfp4")
    assert resolve_recipe("int8_sq", kv_cache="fp8").formats_used == ("fp8", "int8_sq")


def test_auto_recipe(names: list[str]) -> None:
    recipe = resolve_recipe("auto")
    assert recipe.auto is not None and recipe.auto.effective_bits == 6.0
    assert recipe.auto.formats == ("nvfp4", "fp8") and set(PROTECTED) <= set(recipe.auto.excluded)
    plan = recipe.assign(names)
    assert plan["lm.lm_head"] == plan["visual.patch_embed.proj"] == "none"
    assert plan["lm.layers.0.mlp.up_proj"] == AUTO
    kwargs = recipe.auto_quantize_kwargs()
    assert kwargs["constraints"] == {"effective_bits": 6.0}
    assert kwargs["quantization_formats"] == [mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG]
    assert "lm.lm_head" in kwargs["disabled_layers"]
    with pytest.raises(RecipeError, match="auto_quantize"):
        recipe.modelopt_config()
    custom = resolve_recipe("auto", effective_bits="5", formats="fp8,w4a8", exclude="visual.*")
    assert custom.auto is not None and custom.auto.formats == ("fp8", "w4a8") and "visual.*" in custom.auto.excluded
    with pytest.raises(RecipeError, match=r"\[4.5, 16\]"):
        resolve_recipe("auto", effective_bits=4.0)


@pytest.mark.parametrize("recipe", [
    resolve_recipe("mixed", first_last_layers="fp8", kv_cache="fp8", vision="int8_sq"),
    resolve_recipe("int8_sq"), resolve_recipe("auto", effective_bits=5.5, formats=["nvfp4"]),
    Recipe("custom", (Rule("lm.*", "w4a8"),), description="hand made")])
def test_to_dict_round_trips(recipe: Recipe) -> None:
    data = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(data) == recipe


def test_bad_recipes_say_what_exists() -> None:
    with pytest.raises(RecipeError, match="fp8, nvfp4, w4a8, int8_sq, mixed, auto"):
        resolve_recipe("fp4")
    with pytest.raises(RecipeError, match=r"knob.*vison.*vision, first_last_layers, kv_cache"):
        resolve_recipe("mixed", vison="fp8")
    with pytest.raises(RecipeError, match=r"fp6.*fp8, nvfp4, w4a8, int8_sq, none"):
        resolve_recipe("mixed", vision="fp6")
    with pytest.raises(RecipeError, match=r"kv_cache.*fp8"):
        resolve_recipe("fp8", kv_cache="int8")
    with pytest.raises(RecipeError, match="unknown recipe field"):
        Recipe.from_dict({"name": "x", "rules": [], "extra": 1})
    with pytest.raises(RecipeError, match="malformed"):
        Recipe.from_dict({"name": "x", "rules": [{"pattern": "lm.*"}]})


def test_orin_refuses_fp8_and_fp4(names: list[str]) -> None:
    for name in ("fp8", "nvfp4", "mixed"):
        with pytest.raises(PrecisionNotSupportedError) as err:
            check_recipe(resolve_recipe(name), "orin", allow_emulated=True, module_names=names)
        message = str(err.value)
        assert "sm_87" in message and "int8" in message and "lm.layers.0." in message
        assert "--allow-emulated" not in message  # nothing to emulate on Orin
    assert check_recipe(resolve_recipe("int8_sq"), "orin") == []
    with pytest.raises(PrecisionNotSupportedError, match="KV cache"):
        check_recipe(resolve_recipe("int8_sq", kv_cache="fp8"), "orin")


def test_thor_h100_and_cpu_gates(names: list[str]) -> None:
    for name in FIXED:
        assert check_recipe(resolve_recipe(name, kv_cache="fp8"), "thor") == []
    assert check_recipe(resolve_recipe("fp8"), "h100") == []
    with pytest.raises(PrecisionNotSupportedError) as err:
        check_recipe(resolve_recipe("mixed"), TARGETS["h100"], module_names=names)
    message = str(err.value)
    assert "sm_90" in message and "nvfp4" in message and "--allow-emulated" in message
    assert "lm.layers.0.mlp.gate_proj" in message and "(+" in message
    notes = check_recipe(resolve_recipe("mixed"), "h100", allow_emulated=True)
    assert notes and "nvfp4 runs as fake quantization on h100" in notes[0]
    with pytest.raises(PrecisionNotSupportedError, match="every module the auto search"):
        check_recipe(resolve_recipe("auto"), "rtx-ada")
    for name in RECIPES:
        (note,) = check_recipe(resolve_recipe(name, kv_cache="fp8"), "cpu")
        assert "fake quantization" in note
    assert check_recipe(Recipe("fp16", (Rule("*", "none"),)), "orin") == []


def test_unknown_target_lists_targets() -> None:
    assert resolve_target("Orin").sm == "sm_87"
    with pytest.raises(TargetError, match="orin, thor, h100, rtx-ada, cpu"):
        resolve_target("xavier")
