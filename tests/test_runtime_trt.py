"""The TensorRT backend: its memory layer, engine selection over a real bundle of TensorRT-RTX engines built on
the CPU, the planner route of ``planner_from_bundle(backend="tensorrt")``, how the backend feeds ``key_end`` (host
shape tensor or device input) over stand-ins for the engine and the device memory, and (``gpu``) the engines
planning like ONNX Runtime (plugin engines too, with TensorRT proper), fp16 top-1 agreement through Polygraphy,
and CUDA-graph replay equal to eager execution."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import torch_threads

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export.build import export_bundle
from blockpilot.formats.bundle import Artifact, Bundle, load_bundle
from blockpilot.runtime.backend import Prompt
from blockpilot.runtime.bundle_planner import planner_from_bundle
from blockpilot.runtime.cuda_memory import CudaMemory, CudaUnavailableError, DeviceBuffer
from blockpilot.runtime.plan_types import DecoderSettings, PlannerSetupError
from blockpilot.runtime.trt_backend import EngineSelectionError, TrtBackend, normalize_cc, select_engines, trt_planner
from blockpilot.runtime.trt_engine import TrtEngine
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


# -- key_end on the host or the device: the backend over stand-ins for TensorRT's engine and the device memory ------


class _Memory:
    """Device memory stand-in: buffers are addresses, pinned arrays are numpy; uploads and graphs are recorded."""

    compute_capability, stream, supports_graphs, api = "8.7", 7, True, "stand-in"

    def __init__(self) -> None:
        self.next, self.capturing = 1 << 20, False
        self.uploads: list[tuple[str, np.ndarray]] = []
        self.launched: list[object] = []

    def alloc(self, name: str, nbytes: int) -> DeviceBuffer:
        self.next += max(nbytes, 1) + 256
        return DeviceBuffer(name, self.next, nbytes)

    def pinned(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype)

    def upload(self, dst: DeviceBuffer, host: np.ndarray) -> None:
        self.uploads.append((dst.name, host.copy()))

    def capture(self, work: Any) -> object:
        self.capturing = True  # the enqueue is recorded into the graph, not run
        work()
        self.capturing = False
        return object()

    def launch(self, graph: object) -> None:
        self.launched.append(graph)

    def memset(self, *_: Any) -> None: ...
    def download(self, *_: Any) -> None: ...
    def synchronize(self) -> None: ...
    def drop_graph(self, _: object) -> None: ...
    def close(self) -> None: ...


class _Engine:
    """An ``ICudaEngine`` stand-in with the export's LM-step I/O; ``key_end`` a shape tensor or not. Its contexts
    record, at each enqueue that runs, the ``key_end`` TensorRT would read: the host value at its address for a
    shape tensor, else the last value uploaded to its device buffer."""

    def __init__(self, spec: dict[str, Any], memory: _Memory, key_end_on_host: bool) -> None:
        cache = tuple(spec["lm_step"]["inputs"][5]["shape"])
        cap, hidden = spec["capacity"], spec["hidden_size"]
        scalar: tuple[tuple[int, ...], str, tuple[int, ...]] = ((), "INT64", ())
        self.io: dict[str, tuple[tuple[int, ...], str, Any]] = {
            "inputs_embeds": ((1, -1, hidden), "FLOAT", (1, cap, hidden)),
            "position_ids": ((3, 1, -1), "INT64", (3, 1, cap)), "start": scalar, "key_end": scalar, "mode": scalar,
            "past_k": (cache, "FLOAT", cache), "past_v": (cache, "FLOAT", cache), "top1": ((1, -1), "INT64", None),
            "prob": ((1, -1), "FLOAT", None), "present_k": (cache, "FLOAT", None), "present_v": (cache, "FLOAT", None)}
        self.names, self.memory, self.host = list(self.io), memory, key_end_on_host
        self.num_io_tensors, self.device_memory_size_v2 = len(self.names), 4096
        self.key_ends: list[int] = []

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if self.io[name][2] is not None else "output"

    def is_shape_inference_io(self, name: str) -> bool:
        return self.host and name == "key_end"

    def get_tensor_dtype(self, name: str) -> str:
        return f"DataType.{self.io[name][1]}"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name][0]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[Any, ...]:
        return (None, None, self.io[name][2])

    def get_aliased_input_tensor(self, name: str) -> None:
        return None

    def create_execution_context(self) -> Any:
        addresses: dict[str, int] = {}
        shapes: dict[str, tuple[int, ...]] = {}

        def run(stream: int) -> bool:
            if not self.memory.capturing:
                self.key_ends.append(ctypes.c_int64.from_address(addresses["key_end"]).value if self.host else
                                     int(next(v for n, v in reversed(self.memory.uploads) if n == "key_end")[0]))
            return True

        return SimpleNamespace(
            addresses=addresses, execute_async_v3=run, is_stream_capturable=lambda stream: True,
            set_tensor_address=lambda name, ptr: addresses.__setitem__(name, ptr) or True,
            set_input_shape=lambda name, shape: shapes.__setitem__(name, shape) or True,
            get_tensor_shape=lambda name: (1, shapes["inputs_embeds"][1]) if name in ("top1", "prob")
            else self.io[name][0])


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blockpilot.export.onnx_graphs import export_onnx
    from blockpilot.vla.loader import load_model

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(load_model(SHIPPED_MODEL), out, 64)
    return out


@pytest.mark.parametrize("plugin", [False, True])
def test_key_end_is_fed_where_the_engine_reads_it(onnx_dir: Path, plugin: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.formats.onnx_io import load_spec

    memory = _Memory()
    engine = _Engine(load_spec(onnx_dir), memory, key_end_on_host=not plugin)
    loads: list[dict[str, Any]] = []

    def load(flavor: str, paths: list[Path], cc: str, *, plugin: bool = False) -> list[TrtEngine]:
        loads.append({"flavor": flavor, "plugin": plugin})
        runtime = SimpleNamespace(deserialize_cuda_engine=lambda blob: engine)
        module = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input"), __name__="stand-in", __version__="0")
        return [TrtEngine(module, runtime, p, cc) for p in paths]

    monkeypatch.setattr(TrtEngine, "load", staticmethod(load))
    (tmp_path / "lm.engine").write_bytes(b"")
    backend = TrtBackend(tmp_path / "lm.engine", onnx_dir, memory=memory, plugin=plugin)  # type: ignore[arg-type]
    assert loads == [{"flavor": "tensorrt", "plugin": plugin}]
    assert backend.layout.key_end_on_host is not plugin and ("key_end" in backend._buf) is plugin
    bound = backend._contexts[0].addresses["key_end"]
    assert bound == (backend._buf["key_end"].ptr if plugin else backend._staged["key_end"].ctypes.data)
    backend.prefill(Prompt(np.arange(10, 30)))
    block = np.full((1, 32), 5, dtype=np.int64)
    for _ in range(2):  # a denoising draft twice: one key, captured at first sight, then replayed
        backend.step(block, 20, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    for start in (20, 19):  # one-token steps: their key repeats only where key_end is not part of it
        backend.step(block[:, :1], start, mode=AttentionMode.CAUSAL, write_kv=False)
    assert engine.key_ends == [20, 52, 21, 20] and len(memory.launched) == 1
    assert backend.graphs.captures == 1 + int(plugin)  # (1, -1, parity) repeats with a device key_end
    assert [int(v[0]) for n, v in memory.uploads if n == "key_end"] == ([20, 52, 52, 21, 20] if plugin else [])
    backend.close()


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


def _plans_match_onnxruntime(bundle: Path, frames: int) -> Any:
    """The bundle's TensorRT planner, after planning ``frames`` held-out observations to the same tokens as its
    ONNX Runtime planner (the caller closes its backend)."""
    settings = DecoderSettings(name="scaffold")
    trt = planner_from_bundle(bundle, decoder=settings, backend="tensorrt")
    ort = planner_from_bundle(bundle, decoder=settings)
    for frame in heldout_keyframes(2, stride=12)[::3][:frames]:
        obs = observation(frame)
        got, want = trt.plan(obs), ort.plan(obs)
        assert np.array_equal(got.tokens, want.tokens), (got.text, want.text)
    return trt


@pytest.mark.gpu
def test_tensorrt_plans_equal_onnxruntime_plans_fp32(fp32_bundle: Path) -> None:
    _plans_match_onnxruntime(fp32_bundle, 3).backend.close()


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
@pytest.mark.tensorrt
def test_plugin_engine_plans_equal_onnxruntime_plans(tmp_path_factory: pytest.TempPathFactory, gpu_cc: str) -> None:
    """A plugin LM engine (built here with TensorRT proper) on the TensorRT backend: the plugin is registered
    from the runtime's load path, key_end is a device input, and plans match ONNX Runtime's."""
    from blockpilot.export.targets import ENGINE_TARGETS

    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("plugin engines need TensorRT proper")
    target = next((t for t in ENGINE_TARGETS.values() if t.sm == gpu_cc and not t.ahead_of_time), None)
    if target is None:
        pytest.skip(f"no TensorRT-proper target for sm {gpu_cc}")
    with torch_threads(1):
        path = export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("plugin") / "b", targets=(target.name,),
                             engine_precision="fp32", attention="plugin").bundle
    assert select_engines(load_bundle(path), gpu_cc)["lm_step"].variant == "plugin"
    trt = _plans_match_onnxruntime(path, 2)
    assert not trt.backend.layout.key_end_on_host
    trt.backend.close()


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
