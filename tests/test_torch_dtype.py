"""The torch backend plans in the checkpoint's dtype: ``--dtype auto|float32|bfloat16|float16``.

``auto`` resolves from the safetensors headers (bfloat16 for a bf16 checkpoint, float32 for the fp32 reference);
a bf16 / fp16 plan (vision tower, M-RoPE, image features, typed slots, KV cache) runs in that dtype end to end;
unknown dtypes are refused naming the option. The bf16 / fp16 fixtures are the shipped reference model's weights
rounded to that dtype and written in the HF layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.runtime.plan_types import DecoderSettings, Observation, PlannerSetupError
from blockpilot.runtime.planner import Planner
from blockpilot.vla.dtypes import DtypeError, resolve_dtype, stored_dtype
from blockpilot.vla.loader import load_model, save_checkpoint
from blockpilot.vla.prompt import EgoState

EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference checkpoint stored in bfloat16 and in float16 (config, tokenizer, schema, image policy)."""
    out = {}
    for dtype in ("bfloat16", "float16"):
        path = tmp_path_factory.mktemp("narrow") / dtype
        save_checkpoint(load_model(SHIPPED_MODEL, dtype=dtype), path)
        for name in ("tokenizer.json", "blockpilot.json", "preprocessor_config.json"):
            shutil.copy(SHIPPED_MODEL / name, path / name)
        out[dtype] = path
    return out


def _observation() -> Observation:
    ego = EgoState(np.array([[-7.5, 0.0], [-5.0, 0.0], [-2.5, 0.0], [0.0, 0.0]]), speed_mps=5.0, accel_mps2=0.0)
    return Observation([np.full((112, 112, 3), 127, np.uint8)], ego, "go straight")


def test_auto_is_the_stored_dtype(narrow: dict[str, Path]) -> None:
    assert stored_dtype(SHIPPED_MODEL) == "float32" and resolve_dtype(SHIPPED_MODEL, "auto") == "float32"
    assert resolve_dtype(narrow["bfloat16"], "auto") == "bfloat16"
    assert resolve_dtype(narrow["float16"], "auto") == "float16"
    assert resolve_dtype(narrow["bfloat16"], "float32") == "float32"  # an explicit dtype wins


@pytest.mark.parametrize(("stored", "expected"), [
    ({"a": torch.bfloat16, "model.rotary_emb.inv_freq": torch.float32, "ids": torch.int64}, "bfloat16"),
    ({"a": torch.bfloat16, "b": torch.float32}, "float32"),
    ({"a": torch.bfloat16, "b": torch.float16}, "float32"),  # neither holds the other
    ({"a": torch.float16}, "float16"),
    ({"a": torch.float64}, "float32"),
])
def test_auto_of_mixed_checkpoints_is_the_widest(tmp_path: Path, stored: dict[str, torch.dtype],
                                                 expected: str) -> None:
    save_file({k: torch.zeros(2, dtype=d) for k, d in stored.items()}, str(tmp_path / "model.safetensors"))
    assert stored_dtype(tmp_path) == expected


def test_bf16_checkpoint_plans_in_bf16_with_an_image(narrow: dict[str, Path]) -> None:
    planner = Planner.from_checkpoint(narrow["bfloat16"], dtype="auto", decoder=DecoderSettings(name="scaffold"))
    backend = planner.backend
    model = backend.model  # type: ignore[attr-defined]
    # Every weight (LM and vision tower) and the KV cache in bf16: no float32 copy of the model.
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.visual is not None
    assert backend._single.k.dtype == backend._single.v.dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert backend.dtype == "bfloat16"  # type: ignore[attr-defined]
    plan = planner.plan(_observation())  # vision, M-RoPE, image features cast, typed slots, float32 softmax
    assert plan.ok and plan.stats.image_tokens > 0, plan.error


def test_fp16_plan_and_the_published_softmax_run(narrow: dict[str, Path]) -> None:
    fp16 = Planner.from_checkpoint(narrow["float16"], dtype="auto", decoder=DecoderSettings(name="scaffold"))
    assert fp16.backend._single.k.dtype == torch.float16  # type: ignore[attr-defined]
    assert fp16.plan(_observation()).ok
    model_softmax = DecoderSettings(name="scaffold", softmax_dtype="model")  # confidences in bf16, as published
    plan = Planner.from_checkpoint(narrow["bfloat16"], decoder=model_softmax, dtype="auto").plan(_observation())
    assert plan.stats.forwards > 0 and plan.text


def test_reference_auto_plans_exactly_as_float32() -> None:
    obs = _observation()
    auto = Planner.from_checkpoint(SHIPPED_MODEL, dtype="auto").plan(obs)
    fp32 = Planner.from_checkpoint(SHIPPED_MODEL).plan(obs)
    np.testing.assert_array_equal(auto.tokens, fp32.tokens)
    assert auto.text == fp32.text


def test_bad_dtypes_are_refused_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(DtypeError, match="dtype 'float64': the dtype must be one of auto, float32"):
        load_model(SHIPPED_MODEL, dtype="float64")
    with pytest.raises(PlannerSetupError, match="dtype 'fp8'"):
        Planner.from_checkpoint(SHIPPED_MODEL, dtype="fp8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["plan", "--checkpoint", str(SHIPPED_MODEL), "--ego", EGO, "--dtype", "float64"])
    assert exit_.value.code == 2 and "--dtype" in err.getvalue() and "float64" in err.getvalue()
    with contextlib.redirect_stderr(err):
        assert main(["eval", "--source", "nuscenes", "--dataroot", str(tmp_path), "--bundle", str(tmp_path),
                     "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 applies to --checkpoint" in err.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a device this torch cannot run")
def test_a_dtype_the_device_cannot_run_is_refused() -> None:
    with pytest.raises(DtypeError, match=r"--dtype auto \(the checkpoint's float32\): device 'cuda' cannot run it"):
        resolve_dtype(SHIPPED_MODEL, "auto", device="cuda", option="--dtype")


def test_ros_params_take_a_dtype_for_a_checkpoint_only() -> None:
    from blockpilot.ros_nodes.params import ParamsError, PlannerParams

    params = PlannerParams(checkpoint="ckpt", dtype="bfloat16")
    assert params.planner_options()["dtype"] == "bfloat16" and PlannerParams().dtype == "auto"
    with pytest.raises(ParamsError, match="dtype: must be one of"):
        PlannerParams(checkpoint="ckpt", dtype="float64")
    with pytest.raises(ParamsError, match="dtype: 'float16' applies to a checkpoint"):
        PlannerParams(bundle="b", dtype="float16")


def test_plan_cli_dtype_on_a_fixture(narrow: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(_observation().images[0]).save(image := tmp_path / "front.png")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", "--checkpoint", str(narrow["bfloat16"]), "--ego", EGO, "--image", str(image),
                   "--dtype", "bfloat16"])
    plan = json.loads(out.getvalue())
    assert rc == 0 and plan["parse_error"] is None and len(plan["waypoints"]) > 0


def test_scale_probe_loads_and_plans_in_the_checkpoint_dtype(narrow: dict[str, Path]) -> None:
    from blockpilot.bench.scale import ScaleOptions, stages_for
    from blockpilot.bench.scale_probe import RESULT_PREFIX
    from blockpilot.bench.scale_probe import main as probe
    from blockpilot.bench.scale_shapes import SCALE_SHAPES

    results = []
    for argv in (["load", str(narrow["bfloat16"])], ["plan", str(narrow["bfloat16"]), "--steps", "2"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert probe(argv) == 0
        results.append(json.loads(out.getvalue().splitlines()[-1].removeprefix(RESULT_PREFIX)))
    assert results[0]["dtypes"] == ["bfloat16"] and results[1]["dtype"] == "bfloat16"
    assert results[1]["steps"] == 2
    stages = {s.name: s.argv for s in stages_for(SCALE_SHAPES["tiny"], ScaleOptions("tiny", Path("w"), Path("r")))}
    assert stages["load"][-2:] == stages["plan-torch"][-2:] == ["--dtype", "auto"]


def test_eval_resume_refuses_another_dtype(tmp_path: Path) -> None:
    from blockpilot.eval.evaluator import _check_resume
    from blockpilot.eval.records import ResultsFileError, ResultsWriter

    header = {"source": "s", "checkpoint": "c", "decoder": {}, "schema": {}, "backend": "torch"}
    with ResultsWriter(tmp_path / "old.jsonl", header=header):  # written before --dtype: planned in float32
        pass
    assert _check_resume(tmp_path / "old.jsonl", {**header, "dtype": "float32"}) == set()
    with pytest.raises(ResultsFileError, match="written for dtype float32, now bfloat16"):
        _check_resume(tmp_path / "old.jsonl", {**header, "dtype": "bfloat16"})


def test_loading_skips_random_init_and_restores_it() -> None:
    normal, uniform = torch.nn.init.normal_, torch.nn.init.kaiming_uniform_
    model = load_model(SHIPPED_MODEL, dtype="auto")
    assert torch.nn.init.normal_ is normal and torch.nn.init.kaiming_uniform_ is uniform
    assert bool(torch.isfinite(model.lm.embed_tokens.weight).all())
    assert float(torch.nn.Linear(8, 8).weight.detach().abs().sum()) > 0  # modules built later are initialised


def test_a_cpu_without_native_bf16_gets_a_note(tmp_path: Path) -> None:
    from blockpilot.vla.dtypes import slow_dtype_note

    (avx2 := tmp_path / "avx2").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    (amx := tmp_path / "amx").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    note = slow_dtype_note("bfloat16", "cpu", str(avx2))
    assert note is not None and "avx512_bf16" in note and "--dtype float32" in note
    assert slow_dtype_note("bfloat16", "cpu", str(amx)) is None
    assert slow_dtype_note("float16", "cpu", str(amx)) is not None  # no avx512_fp16 / amx_fp16 in those flags
    assert slow_dtype_note("float32", "cpu", str(avx2)) is None
    assert slow_dtype_note("bfloat16", "cuda", str(avx2)) is None
    assert slow_dtype_note("bfloat16", "cpu", str(tmp_path / "missing")) is None
