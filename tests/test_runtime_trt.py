"""The TensorRT backend: its memory layer, engine selection over a real bundle of TensorRT-RTX engines built on
the CPU, the planner route of ``planner_from_bundle(backend="tensorrt")``, and (``gpu``) the engines planning
like ONNX Runtime, fp16 top-1 agreement through Polygraphy, and CUDA-graph replay equal to eager execution."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import torch_threads

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export.build import export_bundle
from blockpilot.formats.bundle import Artifact, Bundle, load_bundle
from blockpilot.runtime.bundle_planner import planner_from_bundle
from blockpilot.runtime.cuda_memory import CudaMemory, CudaUnavailableError
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError
from blockpilot.runtime.trt_backend import EngineSelectionError, normalize_cc, select_engines, trt_planner
from blockpilot.vla.modes import AttentionMode


def _gpu() -> str | None:
    """This machine's compute capability, or ``None`` where cuda-python reaches no GPU."""
    try:
        with CudaMemory() as memory:
            return memory.compute_capability
    except CudaUnavailableError:
        return None


@pytest.fixture(scope="module")
def rtx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The shipped model with fp16 TensorRT-RTX engines for sm 8.9 (built here, no GPU needed)."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX (the trt extra) is not installed")
    with torch_threads(1):
        return load_bundle(export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("trt") / "b", targets=("rtx-ada",),
                                         engine_precision="fp16").bundle)


def test_cuda_memory_opens_or_says_why() -> None:
    cc = _gpu()
    if cc is not None:  # a GPU machine: the same call works
        assert re.fullmatch(r"\d+\.\d+", cc)
        return
    with pytest.raises(CudaUnavailableError, match="no usable CUDA GPU") as info:
        CudaMemory()
    assert "NVIDIA driver" in str(info.value)  # this machine: cuda-python is here, the driver is not
    if importlib.util.find_spec("pycuda") is None:
        with pytest.raises(CudaUnavailableError, match="pycuda is not installed"):
            CudaMemory(api="pycuda")
    with pytest.raises(ValueError, match="CUDA api"):
        CudaMemory(api="opencl")


def test_normalize_cc() -> None:
    assert {normalize_cc(v) for v in ("8.9", "sm89", "sm_89", "89", (8, 9))} == {"8.9"}
    assert normalize_cc("sm120") == normalize_cc("12.0") == "12.0"
    with pytest.raises(ValueError):
        normalize_cc("ada")


def test_select_engines_picks_this_gpus_engines(rtx_bundle: Bundle) -> None:
    chosen = select_engines(rtx_bundle, "8.9")
    assert {r: (a.sm, a.precision, a.variant) for r, a in chosen.items()} == {
        "lm_step": ("8.9", "fp16", "native"), "vision": ("8.9", "fp16", "decomposed")}
    assert all(rtx_bundle.file(a.path).stat().st_size > 100_000 for a in chosen.values())
    assert select_engines(rtx_bundle, (8, 9)) == chosen == select_engines(rtx_bundle, "sm89")


def test_select_engines_refuses_another_gpu_listing_the_bundle(rtx_bundle: Bundle) -> None:
    with pytest.raises(EngineSelectionError, match=r"compute capability 9\.0") as info:
        select_engines(rtx_bundle, "9.0")  # H100: TensorRT-RTX engines do not run there
    message = str(info.value)
    assert "lm_step fp16 native for rtx (sm 8.9)" in message and "vision fp16 decomposed for rtx (sm 8.9)" in message
    assert isinstance(info.value, PlannerSetupError)
    with pytest.raises(EngineSelectionError, match="precision fp32"):
        select_engines(rtx_bundle, "8.9", precision="fp32")
    with pytest.raises(EngineSelectionError, match="variant decomposed"):
        select_engines(rtx_bundle, "8.9", variant="decomposed")


def test_select_engines_prefers_lower_precision_and_native_attention(rtx_bundle: Bundle) -> None:
    def extra(artifact: Artifact, **changes: str) -> Artifact:
        return dataclasses.replace(artifact, **changes)

    lm = select_engines(rtx_bundle, "8.9")["lm_step"]
    more = (extra(lm, precision="fp32"), extra(lm, variant="decomposed"), extra(lm, precision="fp8"),
            extra(lm, precision="fp8", variant="decomposed"), extra(lm, precision="fp8", sm="12.0"))
    bundle = dataclasses.replace(rtx_bundle, artifacts=rtx_bundle.artifacts + more)
    pick = select_engines(bundle, "8.9")["lm_step"]
    assert (pick.precision, pick.variant, pick.sm) == ("fp8", "native", "8.9")
    pick = select_engines(bundle, "8.9", precision="fp16", variant="decomposed")["lm_step"]
    assert (pick.precision, pick.variant) == ("fp16", "decomposed")
    with pytest.raises(EngineSelectionError, match=r"no vision engine for compute capability 12\.0"):
        select_engines(bundle, "12.0")  # an LM engine alone is not enough for a model with a vision tower


def test_planner_from_bundle_on_tensorrt_names_the_missing_gpu(rtx_bundle: Bundle) -> None:
    cc = _gpu()
    if cc is None:
        with pytest.raises(PlannerSetupError, match="the tensorrt backend needs an NVIDIA GPU") as info:
            planner_from_bundle(rtx_bundle.path, backend="tensorrt")
        assert "NVIDIA driver" in str(info.value)
    elif cc != "8.9":
        with pytest.raises(EngineSelectionError, match=f"compute capability {re.escape(cc)}"):
            planner_from_bundle(rtx_bundle.path, backend="tensorrt")
    with pytest.raises(PlannerSetupError, match="rollouts"):
        trt_planner(rtx_bundle.path, decoder=DecoderSettings(name="rollouts"))
    with pytest.raises(PlannerSetupError, match="onnxruntime, tensorrt"):
        planner_from_bundle(rtx_bundle.path, backend="torch")


def test_verify_auto_says_why_the_engines_were_not_compared(rtx_bundle: Bundle) -> None:
    from blockpilot.export.verify import VerifyReport, verify_bundle

    if _gpu() == "8.9":  # the engines run here: auto compares them instead (see the gpu tests)
        return
    with torch_threads(1):
        report = verify_bundle(rtx_bundle.path, SHIPPED_MODEL, samples=1)
    assert isinstance(report, VerifyReport) and report.passed
    assert report.note and f"tensorrt not compared: {report.note}" in report.text()
    assert report.to_dict()["backend"] == "onnxruntime"


# -- on a GPU (the lent device): engines for its compute capability, built there --------------------------------


@pytest.fixture(scope="module")
def gpu_cc() -> str:
    cc = _gpu()
    if cc is None:
        pytest.skip("no CUDA GPU here")
    return cc


def _engine_bundle(tmp: Path, cc: str, precision: str) -> Path:
    """A bundle with engines that run on this GPU: TensorRT-RTX for sm 8.x / 12.x, else TensorRT proper here."""
    from blockpilot.export.targets import ENGINE_TARGETS

    for target in ENGINE_TARGETS.values():
        module = "tensorrt_rtx" if target.ahead_of_time else "tensorrt"
        if target.sm == cc and precision in target.precisions and importlib.util.find_spec(module) is not None:
            with torch_threads(1):
                return export_bundle(SHIPPED_MODEL, tmp / f"{target.name}-{precision}", targets=(target.name,),
                                     engine_precision=precision).bundle
    pytest.skip(f"no engine target for sm {cc} with the TensorRT installed here")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, gpu_cc: str) -> Path:
    return _engine_bundle(tmp_path_factory.mktemp("gpu"), gpu_cc, "fp32")


@pytest.mark.gpu
def test_cuda_memory_round_trip_and_graph_replay(gpu_cc: str) -> None:
    with CudaMemory() as memory:
        data = np.arange(1024, dtype=np.float32)
        a, b = memory.alloc("a", data.nbytes), memory.alloc("b", data.nbytes)
        staged, back = memory.pinned(1024, np.float32), memory.pinned(1024, np.float32)
        staged[:] = data
        memory.upload(a, staged)
        memory.copy(b, a)
        memory.download(back, b)
        memory.synchronize()
        np.testing.assert_array_equal(back, data)
        memory.memset(b)
        memory.download(back, b)
        memory.synchronize()
        assert not back.any()
        if memory.supports_graphs:
            graph = memory.capture(lambda: memory.copy(b, a))  # recorded, not run
            memory.download(back, b)
            memory.synchronize()
            assert not back.any()
            memory.launch(graph)
            memory.download(back, b)
            memory.synchronize()
            np.testing.assert_array_equal(back, data)
        assert memory.allocated_bytes == 2 * data.nbytes


@pytest.mark.gpu
def test_tensorrt_plans_equal_onnxruntime_plans_fp32(fp32_bundle: Path) -> None:
    settings = DecoderSettings(name="scaffold")
    trt = planner_from_bundle(fp32_bundle, decoder=settings, backend="tensorrt")
    ort = planner_from_bundle(fp32_bundle, decoder=settings)
    for frame in heldout_keyframes(2, stride=12)[::3][:3]:
        obs = observation(frame)
        got, want = trt.plan(obs), ort.plan(obs)
        assert np.array_equal(got.tokens, want.tokens), (got.text, want.text)
    trt.backend.close()


@pytest.mark.gpu
def test_fp16_engines_top1_agreement_is_reported(tmp_path_factory: pytest.TempPathFactory, gpu_cc: str) -> None:
    from blockpilot.export.verify_trt import TOLERANCES, verify_engines

    bundle = _engine_bundle(tmp_path_factory.mktemp("gpu16"), gpu_cc, "fp16")
    report = verify_engines(bundle, samples=2, steps=2)
    print(report.text())
    lm = next(c for c in report.comparisons if c.role == "lm_step")
    assert lm.top1_agreement is not None and lm.top1_agreement >= TOLERANCES["fp16"][1]
    assert "top1 agreement" in report.text() and report.passed, report.text()


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(fp32_bundle: Path) -> None:
    from blockpilot.runtime.trt_backend import TrtBackend, engine_flavor

    bundle = load_bundle(fp32_bundle)
    planner = planner_from_bundle(fp32_bundle, decoder=DecoderSettings(name="scaffold"))
    prompt, _ = planner.prompt(observation(heldout_keyframes(1, stride=12)[0]))
    engines = select_engines(bundle, _gpu() or "")
    graphs_dir = bundle.file(next(a for a in bundle.graphs(variant="decomposed") if a.role == "lm_step").path).parent
    vision = engines.get("vision")
    mask = planner.config.tokens.mask
    runs = []
    for limit in (4, 0):
        with TrtBackend(bundle.file(engines["lm_step"].path), graphs_dir, flavor=engine_flavor(engines["lm_step"]),
                        vision_engine=None if vision is None else bundle.file(vision.path), cuda_graphs=limit) as be:
            out = [be.prefill(prompt)]
            n, block = be.length, np.full((1, 32), mask, dtype=np.int64)
            for _ in range(3):  # repeated denoising steps of one block: one key, replayed after the first
                out.append(be.step(block, n, mode=AttentionMode.BIDIRECTIONAL, write_kv=False))
            out.append(be.step(block, n, mode=AttentionMode.CAUSAL, write_kv=True))
            out.append(be.step(block[:, :8], be.length, mode=AttentionMode.BIDIRECTIONAL, write_kv=False))
            runs.append(out)
            if limit:
                assert be.graphs.replays >= 2 or be.graph_note, "graphs on, yet nothing replayed"
                print("cuda graphs:", be.graph_note or f"{be.graphs.captures} captured, {be.graphs.replays} replayed")
    for graphed, eager in zip(*runs, strict=True):
        np.testing.assert_array_equal(graphed.top1, eager.top1)
        np.testing.assert_array_equal(graphed.prob, eager.prob)
