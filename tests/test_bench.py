"""``blockpilot bench`` on the CPU, reference model only, few repeats: the JSON and table have their structure, and
every ratio is computed from numbers measured in the same run. Nothing here asserts on a time."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from blockpilot.bench.estimate import VISION_SHAPES, image_grid, plan_estimates
from blockpilot.bench.measure import cpu_name
from blockpilot.bench.models import SHAPES, forward_bytes, weight_bytes
from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL
from blockpilot.runtime.cuda_backend import CudaBackend
from blockpilot.vla.loader import load_model

DECODERS = ("ar", "block", "scaffold")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["bench", "--models", "reference,1.5b", "--dtypes", "fp32,fp8", "--device", "cpu",
                   "--repeats", "2", "--plan-repeats", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), buffer.getvalue()


def test_report_structure(bench: tuple[dict[str, Any], str]) -> None:
    report, text = bench
    assert report["device"] == {"type": "cpu", "name": cpu_name(), "torch": torch.__version__, "cpu_threads": [1]}
    assert set(report) == {"device", "bandwidth", "settings", "steps", "ar", "plans", "vision", "estimates",
                           "skipped", "failed"}
    assert report["failed"] == [] and report["estimates"] == []  # no large shape ran: nothing to estimate
    assert [(r["model"], r["dtype"], r["backend"], r["threads"]) for r in report["steps"]] == \
        [("reference", "fp32", "torch", 1)]
    assert {(r["impl"], r["threads"]) for r in report["ar"]} == {("transformers generate", 1), ("blockpilot torch", 1)}
    backends = {(r["backend"], r["decoder"]) for r in report["plans"]}
    assert backends == {(b, d) for b in ("torch", "onnxruntime") for d in DECODERS}
    # the large shape is skipped on a CPU without --allow-slow, and FP8 needs a GPU: both say so
    assert any(s.startswith("1.5b fp32: skipped on the CPU") and "--allow-slow" in s for s in report["skipped"])
    assert any(s.startswith("reference fp8") for s in report["skipped"])
    for header in ("| model", "roofline ms", "x transformers", "tokens/forward", "< 200 ms", "skipped: 1.5b fp32"):
        assert header in text
    assert f"blockpilot bench on {cpu_name()} (cpu" in text


def test_ratios_come_from_measured_numbers(bench: tuple[dict[str, Any], str]) -> None:
    report, _ = bench
    bw = report["bandwidth"]
    bytes_per_s = 2 * bw["bytes"] / bw["seconds"]
    assert bw["seconds"] > 0 and bw["gb_per_s"] == pytest.approx(bytes_per_s / 1e9)
    (step,) = report["steps"]
    lm = load_model(SHIPPED_MODEL).config.lm
    need = forward_bytes(lm, "fp32", 1024 + 32)
    assert (step["weight_bytes"], step["kv_bytes"], step["bytes"]) == (need.weights, need.kv, need.total)
    assert step["roofline_ms"] == pytest.approx(step["bytes"] / bytes_per_s * 1e3)
    assert step["ratio"] == pytest.approx(step["step_ms"] / step["roofline_ms"])
    assert step["ar_roofline_ms"] == pytest.approx(forward_bytes(lm, "fp32", 1025).total / bytes_per_s * 1e3)
    assert step["ar_ratio"] == pytest.approx(step["ar_ms"] / step["ar_roofline_ms"])
    hf = next(r for r in report["ar"] if r["impl"] == "transformers generate")
    ours = next(r for r in report["ar"] if r["impl"] == "blockpilot torch")
    assert ours["ms_per_token"] == step["ar_ms"]
    if hf["ms_per_token"] is None:  # noise swamped transformers' per-token time: no ratio is made up
        assert ours["speedup_vs_transformers"] is None
    else:
        assert ours["speedup_vs_transformers"] == pytest.approx(hf["ms_per_token"] / ours["ms_per_token"])
    assert step["prefill_ms"] > 0
    for plan in report["plans"]:
        assert 1 <= plan["prefill_forwards"] < plan["forwards"]
        assert plan["cpu_target_met"] == (plan["p50_ms"] < 200.0) and plan["parsed"]
        assert plan["tokens_per_forward"] > 0 and plan["forwards"] > 0 and plan["prompt_tokens"] > 0


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_byte_count_is_what_the_backend_holds(precision: str) -> None:
    model = load_model(SHIPPED_MODEL)
    backend = CudaBackend(model, 64, device="cpu", precision=precision)
    assert backend.weight_bytes() == weight_bytes(model.config.lm, precision)


def test_shapes_are_the_published_ones() -> None:
    small, large = SHAPES["1.5b"], SHAPES["3b"]
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads, small.intermediate_size) == \
        (1536, 28, 12, 2, 8960)
    assert (large.hidden_size, large.num_layers, large.num_heads, large.num_kv_heads, large.intermediate_size) == \
        (2048, 36, 16, 2, 11008)
    assert small.vocab_size == large.vocab_size == 151936 and large.mrope_section == (16, 24, 24)
    # bf16 weights of the 3B LM with its tied head: about 3.1 G parameters, 6.2 GB
    assert 6.0e9 < weight_bytes(large, "bf16") < 6.4e9


def test_bench_refuses_what_it_cannot_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "--device", "tpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--models", "7b"])


def test_plan_estimate_prices_the_reference_plans_forwards_at_the_large_shape() -> None:
    step = {"model": "3b", "dtype": "fp8", "backend": "cuda", "kv_tokens": 1024, "prefill_ms": 20.0, "step_ms": 3.0}
    plans = [{"backend": "cuda", "dtype": "fp8", "decoder": "scaffold", "forwards": 12, "prefill_forwards": 1,
              "tokens_per_forward": 6.5, "tokens": 78},
             {"backend": "cuda", "dtype": "bf16", "decoder": "scaffold", "forwards": 12, "prefill_forwards": 1,
              "tokens_per_forward": 6.5},  # another dtype: not this step's
             {"backend": "torch", "dtype": "fp8", "decoder": "ar", "forwards": 80, "prefill_forwards": 1,
              "tokens_per_forward": 1.0}]  # another backend
    vision = {("3b", "fp8"): {"vision_ms": 15.0, "image": "504x896", "image_tokens": 576}}
    ref_step = {**step, "model": "reference"}
    (row,) = plan_estimates([ref_step, step], plans, vision, {"3b": 25.0})
    assert row["plan_ms"] == pytest.approx(15.0 + 20.0 + 11 * 3.0)
    assert row["tokens_per_s"] == pytest.approx(78 / 68.0 * 1e3)
    assert row["x_transformers"] == pytest.approx(row["tokens_per_s"] / (1e3 / 25.0))
    assert (row["decoder"], row["image_tokens"], row["forwards"]) == ("scaffold", 576, 12)
    (no_vision,) = plan_estimates([step], plans[:1], {})
    assert no_vision["plan_ms"] == pytest.approx(20.0 + 33.0) and no_vision["vision_ms"] is None
    assert no_vision["x_transformers"] is None  # no transformers time: no ratio is made up


def test_image_grid_and_the_image_argument() -> None:
    config = VISION_SHAPES["3b"]
    assert image_grid(504, 896, config) == (36, 64)  # 18 x 32 merged tokens
    assert image_grid(500, 900, config) == (34, 64)  # rounded down to whole merged patches
    with pytest.raises(ValueError, match="smaller than one merged patch"):
        image_grid(20, 896, config)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["bench", "--image", "wide"])
    assert "--image: expected HEIGHTxWIDTH" in err.getvalue()


def test_gpu_check_script_names_files_that_exist() -> None:
    """``scripts/gpu_check.sh`` is what a lent GPU runs in one go: a renamed test or benchmark must not silently
    drop out of it, and the script must parse."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"(?:tests|benchmarks)/[\w./]+\.py", script.read_text()))
    assert {"tests/test_cuda_backend.py", "tests/test_kernel_fused.py", "benchmarks/bench_gpu.py"} <= named
    assert [n for n in sorted(named) if not (root / n).is_file()] == []
    marked = re.compile(r"^@pytest\.mark\.gpu", re.M)
    gpu_modules = {f"tests/{p.name}" for p in (root / "tests").glob("test_*.py") if marked.search(p.read_text())}
    assert "tests/test_cuda_backend.py" in gpu_modules
    assert gpu_modules <= named, "a module with GPU tests is missing from the script"


@pytest.fixture(scope="module")
def robot_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init reference model answering in the shipped robot model's schema (so101-ee-block)."""
    from blockpilot.vla.plans import ActionChunkSchema
    from blockpilot.vla.reference_model import write_reference_checkpoint
    from blockpilot.vla.schema_io import save_schema

    ckpt = write_reference_checkpoint(tmp_path_factory.mktemp("bench_robot") / "ckpt")
    save_schema(ckpt, ActionChunkSchema.so101_ee_block())
    return ckpt


@pytest.fixture(scope="module")
def robot_bundle(robot_checkpoint: Path) -> Path:
    from blockpilot.export.bundle_export import export_bundle

    return export_bundle(robot_checkpoint, robot_checkpoint.parent / "bundle").bundle


def _robot_bench(checkpoint: Path, out: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["bench", "--models", "reference", "--dtypes", "fp32", "--device", "cpu", "--repeats", "1",
                   "--plan-repeats", "1", "--threads", "1", "--no-transformers", "--decoders", "ar,scaffold",
                   "--checkpoint", str(checkpoint), "--out", str(out), *extra])
    return rc, json.loads(out.read_text()), buffer.getvalue()


def test_a_robot_checkpoint_plans_its_robot_prompt(robot_checkpoint: Path, tmp_path: Path) -> None:
    from blockpilot.vla.image_policy import load_image_policy
    from blockpilot.vla.plans import ActionChunkSchema

    schema = ActionChunkSchema.so101_ee_block()
    rc, report, text = _robot_bench(robot_checkpoint, tmp_path / "one.json")
    assert rc == 0 and report["failed"] == []
    described = report["settings"]["plan_observation"]
    assert described["kind"] == "action_chunk" and described["cameras"] == 1
    assert described["state_dims"] == list(schema.state_dims) and described["dims"] == list(schema.dims)
    assert {(r["backend"], r["decoder"]) for r in report["plans"]} == {
        (b, d) for b in ("torch", "onnxruntime") for d in ("ar", "scaffold")}
    for plan in report["plans"]:
        assert plan["schema"] == "action_chunk" and plan["cameras"] == 1 and plan["parsed"] is not None
        assert 1 <= plan["prefill_forwards"] < plan["forwards"] and plan["tokens_per_forward"] > 0
    by = {(r["backend"], r["decoder"]): r for r in report["plans"]}
    assert by["torch", "scaffold"]["forwards"] == by["onnxruntime", "scaffold"]["forwards"]
    assert "a robot prompt: 1 camera(s), 9 state dims, answer 8 x dx, dy, dz, gripper (ee_delta)" in text
    # a second camera (the wrist) adds its image tokens to the prompt
    rc, two, _ = _robot_bench(robot_checkpoint, tmp_path / "two.json", "--cameras", "2", "--no-onnxruntime")
    assert rc == 0 and two["settings"]["plan_observation"]["cameras"] == 2
    one_prompt = by["torch", "scaffold"]["prompt_tokens"]
    (two_scaffold,) = [r for r in two["plans"] if r["decoder"] == "scaffold"]
    vision = load_model(robot_checkpoint).config.vision
    assert vision is not None
    frame = load_image_policy(robot_checkpoint, vision).tokens(*two["settings"]["plan_observation"]["image_hw"])
    assert frame > 0 and two_scaffold["prompt_tokens"] - one_prompt >= frame  # its frame, markers and words


def test_a_robot_bundle_times_the_plans_of_its_own_graphs(robot_checkpoint: Path, robot_bundle: Path,
                                                           tmp_path: Path) -> None:
    bundle = robot_bundle
    argv = ["bench", "--device", "cpu", "--plan-repeats", "1", "--threads", "1", "--decoders", "ar,scaffold"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([*argv, "--bundle", str(bundle), "--out", str(tmp_path / "bundle.json")]) == 0
    report = json.loads((tmp_path / "bundle.json").read_text())
    assert report["steps"] == report["ar"] == [] and report["failed"] == []
    assert [(r["model"], r["backend"], r["dtype"], r["decoder"]) for r in report["plans"]] == [
        ("bundle", "onnxruntime", "fp32", d) for d in ("ar", "scaffold")]
    assert report["settings"]["plan_observation"]["kind"] == "action_chunk"
    assert f"Plans on the bundle {bundle} on ONNX Runtime" in buffer.getvalue()
    # the bundle's graphs plan what the checkpoint's own ONNX Runtime export plans: the same prompt and forwards
    _, from_checkpoint, _ = _robot_bench(robot_checkpoint, tmp_path / "checkpoint.json")
    ort = {r["decoder"]: r for r in from_checkpoint["plans"] if r["backend"] == "onnxruntime"}
    for row in report["plans"]:
        assert (row["prompt_tokens"], row["forwards"]) == (ort[row["decoder"]]["prompt_tokens"],
                                                           ort[row["decoder"]]["forwards"])


@pytest.mark.parametrize("extra, needle", [
    (["--models", "reference"], "--models"),
    (["--checkpoint", "{ckpt}"], "--checkpoint"),
    (["--device", "cuda"], "--device cuda"),
    (["--decoders", "rollouts"], "--decoders rollouts"),
])
def test_bundle_with_model_flags_is_refused_naming_them(extra: list[str], needle: str, robot_checkpoint: Path,
                                                        robot_bundle: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    argv = ["bench", "--bundle", str(robot_bundle), "--out", str(out),
            *(a.format(ckpt=robot_checkpoint) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cameras_with_a_driving_checkpoint_is_refused_before_measuring(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert main(["bench", "--models", "reference", "--device", "cpu", "--cameras", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--cameras 2" in err and "robot checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
