"""The TensorRT backend: its memory layer, engine selection over a real bundle of TensorRT-RTX engines built on
the CPU, the planner route of ``planner_from_bundle(backend="tensorrt")``, how the backend feeds ``key_end`` (host
shape tensor or device input) over stand-ins for the engine and the device memory, and (``gpu``) the engines
planning like ONNX Runtime (plugin engines too, with TensorRT proper), fp16 top-1 agreement through Polygraphy,
and CUDA-graph replay equal to eager execution."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import torch_threads

from blockpilot.demo import SHIPPED_MODEL
from blockpilot.eval.synthetic import heldout_keyframes, observation
from blockpilot.export.bundle_export import export_bundle
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
    """The shipped model with fp16 TensorRT-RTX engines for sm 8.9 (built here, no GPU needed), for a 112x112
    and a 1600x900 camera (two vision engines)."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX (the trt extra) is not installed")
    with torch_threads(1):
        return load_bundle(export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("trt") / "b", targets=("rtx-ada",),
                                         engine_precision="fp16", image_sizes=((112, 112), (900, 1600))).bundle)


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
    with pytest.raises(CudaUnavailableError, match=r"no usable CUDA GPU: cuda\.core cannot reach the NVIDIA driver"):
        CudaMemory(api="cuda-core")  # cuda.core is part of cuda-python here
    with pytest.raises(ValueError, match="CUDA api"):
        CudaMemory(api="opencl")


def test_cuda_core_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where cuda.core is not installed (an older cuda-python, a Jetson image), asking for it says so, and
    ``auto`` never needs it."""
    import importlib as importlib_

    real = importlib_.import_module

    def without_cuda_core(name: str, package: str | None = None) -> Any:
        if name == "cuda.core" or name.startswith("cuda.core."):
            raise ImportError(f"No module named {name!r}")
        return real(name, package)

    monkeypatch.setattr(importlib_, "import_module", without_cuda_core)
    with pytest.raises(CudaUnavailableError, match=r"no CUDA Python bindings: cuda-core is not installed"):
        CudaMemory(api="cuda-core")
    if _gpu() is None:
        with pytest.raises(CudaUnavailableError, match="NVIDIA driver"):  # auto: cuda-python, no cuda.core
            CudaMemory()


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
        self.copies: list[tuple[str, str, dict[str, int]]] = []  # strided device copies (dst, src, layout)
        self.data: dict[str, np.ndarray] | None = None  # with a dict: every buffer also held as bytes, by name

    def alloc(self, name: str, nbytes: int) -> DeviceBuffer:
        self.next += max(nbytes, 1) + 256
        if self.data is not None:
            self.data[name] = np.zeros(nbytes, np.uint8)
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

    def copy_2d(self, dst: DeviceBuffer, src: DeviceBuffer, **layout: int) -> None:
        self.copies.append((dst.name, src.name, layout))
        if self.data is not None:  # a strided copy over byte arrays, as cudaMemcpy2DAsync does it
            out, inp = self.data[dst.name], self.data[src.name]
            for row in range(layout["height"]):
                at, frm = layout["dst_offset"] + row * layout["dst_pitch"], row * layout["src_pitch"]
                out[at:at + layout["width"]] = inp[frm:frm + layout["width"]]

    def memset(self, *_: Any) -> None: ...
    def download(self, *_: Any) -> None: ...
    def synchronize(self) -> None: ...
    def drop_graph(self, _: object) -> None: ...
    def close(self) -> None: ...


class _Engine:
    """An ``ICudaEngine`` stand-in with the export's LM-step I/O; ``key_end`` a shape tensor or not; with
    ``slot_rows`` the typed-slot inputs too (``allowed_table`` up to that many rows). Its contexts record, at each
    enqueue that runs, the ``key_end`` TensorRT would read: the host value at its address for a shape tensor,
    else the last value uploaded to its device buffer; and with typed slots the classes last uploaded."""

    def __init__(self, spec: dict[str, Any], memory: _Memory, key_end_on_host: bool, slot_rows: int = 0,
                 kv_outputs: tuple[str, str] = ("k_new", "v_new"), kv_kind: str = "FLOAT") -> None:
        cache = tuple(spec["lm_step"]["inputs"][5]["shape"])
        cap, hidden = spec["capacity"], spec["hidden_size"]
        window = (*cache[:3], -1, cache[4]) if kv_outputs == ("k_new", "v_new") else cache
        scalar: tuple[tuple[int, ...], str, tuple[int, ...]] = ((), "INT64", ())
        self.io: dict[str, tuple[tuple[int, ...], str, Any]] = {
            "inputs_embeds": ((1, -1, hidden), "FLOAT", (1, cap, hidden)),
            "position_ids": ((3, 1, -1), "INT64", (3, 1, cap)), "start": scalar, "key_end": scalar, "mode": scalar,
            "past_k": (cache, kv_kind, cache), "past_v": (cache, kv_kind, cache), "top1": ((1, -1), "INT64", None),
            "prob": ((1, -1), "FLOAT", None), kv_outputs[0]: (window, kv_kind, None),
            kv_outputs[1]: (window, kv_kind, None)}
        if slot_rows:
            vocab = spec["vocab_size"]
            self.io["allowed_table"] = ((-1, vocab), "BOOL", (slot_rows, vocab))
            self.io["token_class"] = ((1, -1), "INT64", (1, cap))
        self.names, self.memory, self.host = list(self.io), memory, key_end_on_host
        self.num_io_tensors, self.device_memory_size_v2 = len(self.names), 4096
        self.key_ends: list[int] = []
        self.classes: list[list[int]] = []  # the token_class TensorRT would read at each eager run
        self.shapes: list[dict[str, tuple[int, ...]]] = []  # the input shapes of each eager run

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
                self.shapes.append(dict(shapes))
                if "token_class" in self.io:
                    self.classes.append(next(v for n, v in reversed(self.memory.uploads) if n == "token_class")
                                        .tolist())
            return True

        return SimpleNamespace(
            addresses=addresses, execute_async_v3=run, is_stream_capturable=lambda stream: True,
            set_tensor_address=lambda name, ptr: addresses.__setitem__(name, ptr) or True,
            set_input_shape=lambda name, shape: shapes.__setitem__(name, shape) or True,
            get_tensor_shape=lambda name: (1, shapes["inputs_embeds"][1]) if name in ("top1", "prob")
            else tuple(shapes["inputs_embeds"][1] if d == -1 else d for d in self.io[name][0]))


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
    from blockpilot.formats.onnx_spec import load_spec

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
    assert backend.graphs.captures == 1 + int(plugin)  # (1, -1, 0) repeats with a device key_end
    assert [int(v[0]) for n, v in memory.uploads if n == "key_end"] == ([20, 52, 52, 21, 20] if plugin else [])
    backend.close()


@pytest.mark.parametrize(("kv_kind", "dtype"), [("FLOAT", np.float32), ("HALF", np.float16)])
def test_a_committed_step_copies_only_the_windows_rows_into_the_one_cache(onnx_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          kv_kind: str, dtype: Any) -> None:
    """The cache in the engine's dtype (HALF: fp16 engines since the fp16 cache I/O; FLOAT: fp32 engines and
    fp16 engines built before it): buffers, the strided copy's byte layout and the bytes report follow it."""
    from blockpilot.formats.onnx_spec import load_spec
    from blockpilot.runtime.kv_window import write_rows

    memory, spec = _Memory(), load_spec(onnx_dir)
    memory.data = {}
    engine = _Engine(spec, memory, key_end_on_host=True, kv_kind=kv_kind)
    _load_standins(monkeypatch, {"lm.engine": engine})
    (tmp_path / "lm.engine").write_bytes(b"")
    backend = TrtBackend(tmp_path / "lm.engine", onnx_dir, memory=memory)  # type: ignore[arg-type]
    cache = backend.cache_shape
    assert cache == tuple(spec["lm_step"]["inputs"][5]["shape"]) and len(backend._contexts) == 1
    item = np.dtype(dtype).itemsize
    assert backend.cache_dtype == np.dtype(dtype) and backend.cache_bytes == 2 * int(np.prod(cache)) * item
    assert all(backend._kv[n].nbytes == int(np.prod(cache)) * item for n in ("past_k", "past_v"))
    bound = backend._contexts[0].addresses
    assert bound["past_k"] == backend._kv["past_k"].ptr and bound["k_new"] == backend._buf["k_new"].ptr
    assert {"present_k", "present_v"}.isdisjoint(bound)
    backend.prefill(Prompt(np.arange(10, 30)))  # a committed forward of 20 rows at slot 0
    assert [(d, s) for d, s, _ in memory.copies] == [("past_k", "k_new"), ("past_v", "v_new")]
    memory.copies.clear()
    block = np.full((1, 8), 5, dtype=np.int64)
    backend.step(block, 20, mode=AttentionMode.BIDIRECTIONAL, write_kv=False)
    assert memory.copies == []  # a draft copies nothing: the cache stays as it was
    # The engine "wrote" k_new / v_new for a window of 8 at slot 20: the strided copy must land them there.
    t, rng = 8, np.random.default_rng(0)
    window = {n: rng.standard_normal((*cache[:3], t, cache[4])).astype(dtype) for n in ("k_new", "v_new")}
    for name, rows in window.items():
        memory.data[name][:rows.nbytes] = rows.view(np.uint8).reshape(-1)
    before = {n: memory.data[n].view(dtype).reshape(cache).copy() for n in ("past_k", "past_v")}
    backend.step(block, 20, mode=AttentionMode.CAUSAL, write_kv=True)
    for cache_name, new in (("past_k", "k_new"), ("past_v", "v_new")):
        want = before[cache_name].copy()
        write_rows(want, window[new], 20)
        np.testing.assert_array_equal(memory.data[cache_name].view(dtype).reshape(cache), want)
    (_, _, layout), _ = memory.copies
    assert layout == {"width": t * cache[4] * item, "height": cache[0] * cache[2],
                      "dst_pitch": cache[3] * cache[4] * item, "src_pitch": t * cache[4] * item,
                      "dst_offset": 20 * cache[4] * item}
    assert backend.length == 28
    backend.close()


def test_an_engine_of_the_whole_cache_io_is_refused_saying_to_re_export(onnx_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.formats.onnx_spec import load_spec
    from blockpilot.runtime.kv_window import StaleExportError

    memory = _Memory()
    engine = _Engine(load_spec(onnx_dir), memory, key_end_on_host=True, kv_outputs=("present_k", "present_v"))
    _load_standins(monkeypatch, {"lm.engine": engine})
    (tmp_path / "lm.engine").write_bytes(b"")
    with pytest.raises(StaleExportError, match=r"lm\.engine: an lm_step engine of the whole-cache KV I/O .*"
                                               r"re-export the bundle"):
        TrtBackend(tmp_path / "lm.engine", onnx_dir, memory=memory)  # type: ignore[arg-type]
    assert issubclass(StaleExportError, PlannerSetupError)


def test_a_cache_and_window_of_different_types_are_refused(onnx_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.formats.onnx_spec import load_spec

    memory = _Memory()
    engine = _Engine(load_spec(onnx_dir), memory, key_end_on_host=True, kv_kind="HALF")
    engine.io["v_new"] = (engine.io["v_new"][0], "FLOAT", None)  # the rows are copied byte for byte
    _load_standins(monkeypatch, {"lm.engine": engine})
    (tmp_path / "lm.engine").write_bytes(b"")
    with pytest.raises(PlannerSetupError, match=r"k_new / v_new are HALF / FLOAT and the cache is HALF / HALF"):
        TrtBackend(tmp_path / "lm.engine", onnx_dir, memory=memory)  # type: ignore[arg-type]


def _load_standins(monkeypatch: pytest.MonkeyPatch, engines: dict[str, Any]) -> None:
    """``TrtEngine.load`` deserializes each path into the stand-in named by its file name."""
    def load(flavor: str, paths: list[Path], cc: str, *, plugin: bool = False) -> list[TrtEngine]:
        module = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input"), __name__="stand-in", __version__="0")
        return [TrtEngine(module, SimpleNamespace(deserialize_cuda_engine=lambda blob, p=p: engines[p.name]), p, cc)
                for p in paths]

    monkeypatch.setattr(TrtEngine, "load", staticmethod(load))


def test_typed_slots_are_fed_to_an_engine_that_takes_them(onnx_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.export.trt_build import MAX_SLOT_CLASSES, SLOT_TABLE_ROWS
    from blockpilot.formats.onnx_spec import load_spec
    from blockpilot.runtime.backend import AllowedTokens
    from blockpilot.runtime.trt_slots import SlotTableError

    memory, spec = _Memory(), load_spec(onnx_dir)
    vocab = spec["vocab_size"]
    engine = _Engine(spec, memory, key_end_on_host=True, slot_rows=SLOT_TABLE_ROWS)
    _load_standins(monkeypatch, {"lm.engine": engine})
    (tmp_path / "lm.engine").write_bytes(b"")
    backend = TrtBackend(tmp_path / "lm.engine", onnx_dir, memory=memory)  # type: ignore[arg-type]
    assert backend.constrains_tokens and backend.max_slot_classes == MAX_SLOT_CLASSES
    slots = backend._slots
    assert slots is not None
    for context in backend._contexts:  # fixed addresses, bound once per context
        assert context.addresses["allowed_table"] == slots.table.ptr
        assert context.addresses["token_class"] == slots.classes.ptr
    (setup,) = [v for n, v in memory.uploads if n == "allowed_table"]
    assert setup.shape == (SLOT_TABLE_ROWS, vocab) and setup[0].all() and not setup[1:].any()  # row 0: all

    backend.prefill(Prompt(np.arange(10, 30)))  # unconstrained: class 0 everywhere
    assert engine.classes[-1] == [0] * 20
    assert engine.shapes[-1]["allowed_table"] == (SLOT_TABLE_ROWS, vocab)
    assert engine.shapes[-1]["token_class"] == (1, 20)
    table = np.zeros((3, vocab), dtype=np.bool_)
    table[0], table[1, :5], table[2, 5:9] = True, True, True
    block = np.full((1, 32), 5, dtype=np.int64)
    classes = np.array([[0, 1, 2, 1] * 8])
    backend.step(block, 20, mode=AttentionMode.BIDIRECTIONAL, write_kv=False, allowed=AllowedTokens(table, classes))
    assert engine.classes[-1] == (classes[0] + 1).tolist()  # shifted past the reserved allow-all row
    assert engine.shapes[-1]["token_class"] == (1, 32) and engine.shapes[-1]["allowed_table"][0] == SLOT_TABLE_ROWS
    uploaded = [v for n, v in memory.uploads if n == "allowed_table"][1:]
    assert len(uploaded) == 1 and uploaded[0].shape == (4, vocab)
    assert uploaded[0][0].all() and np.array_equal(uploaded[0][1:], table)

    # The same key again: replayed from its CUDA graph, with the new classes written to the fixed buffer first.
    other = np.array([[2, 2, 0, 1] * 8])
    launches = len(memory.launched)
    backend.step(block, 20, mode=AttentionMode.BIDIRECTIONAL, write_kv=False, allowed=AllowedTokens(table, other))
    assert len(memory.launched) == launches + 1
    last_classes = next(v for n, v in reversed(memory.uploads) if n == "token_class")
    assert last_classes.tolist() == (other[0] + 1).tolist()
    assert sum(n == "allowed_table" for n, _ in memory.uploads) == 2  # same table object: not uploaded again

    backend.step(block[:, :1], 20, mode=AttentionMode.CAUSAL, write_kv=True)  # no ``allowed``: unconstrained
    assert engine.classes[-1] == [0]
    again = table.copy()  # another table object (another planner): uploaded
    backend.step(block[:, :2], 21, mode=AttentionMode.CAUSAL, write_kv=False,
                 allowed=AllowedTokens(again, np.array([[1, 2]])))
    assert sum(n == "allowed_table" for n, _ in memory.uploads) == 3 and engine.classes[-1] == [2, 3]
    assert slots.table_uploads == 2

    too_many = np.ones((MAX_SLOT_CLASSES + 1, vocab), dtype=np.bool_)
    with pytest.raises(SlotTableError, match=f"up to {MAX_SLOT_CLASSES} classes"):
        backend.step(block[:, :1], 21, mode=AttentionMode.CAUSAL, write_kv=False,
                     allowed=AllowedTokens(too_many, np.zeros((1, 1), dtype=np.int64)))
    backend.close()


@pytest.fixture(scope="module")
def sized_onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model exported for a 112x112 and a 1600x900 camera (two vision graphs: 112x112, 140x56)."""
    from blockpilot.export.onnx_graphs import export_onnx
    from blockpilot.vla.image_policy import load_image_policy
    from blockpilot.vla.loader import load_model

    out = tmp_path_factory.mktemp("sized")
    model = load_model(SHIPPED_MODEL)
    assert model.config.vision is not None
    with torch_threads(1):
        export_onnx(model, out, 320, image_sizes=[(112, 112), (900, 1600)],
                    policy=load_image_policy(SHIPPED_MODEL, model.config.vision))
    return out


def test_planner_constrains_on_new_engines_and_not_on_older_ones(sized_onnx_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.formats.onnx_spec import load_spec
    from blockpilot.runtime.backend import AllowedTokens
    from blockpilot.runtime.graph_backend import driving_model_files
    from blockpilot.runtime.planner import Planner
    from blockpilot.runtime.trt_backend import TrtUnsupportedError

    onnx_dir = sized_onnx_dir  # a cache that holds the scaffold decoder's answer budget
    spec = load_spec(onnx_dir)
    config, tokenizer, schema = driving_model_files(SHIPPED_MODEL)
    (tmp_path / "lm.engine").write_bytes(b"")
    settings = DecoderSettings(name="scaffold")
    planners = {}
    for rows in (65, 0, 8):  # the default profile, an engine from before typed slots, a too-small profile
        memory = _Memory()
        _load_standins(monkeypatch, {"lm.engine": _Engine(spec, memory, key_end_on_host=True, slot_rows=rows)})
        backend = TrtBackend(tmp_path / "lm.engine", onnx_dir, memory=memory)  # type: ignore[arg-type]
        if rows == 8:  # the driving schema has 16 classes on the reference tokenizer
            with pytest.raises(PlannerSetupError, match="need 16 allowed-token classes; the TrtBackend engine "
                                                        "takes up to 7"):
                Planner(backend, config, tokenizer, decoder=settings, schema=schema)
            continue
        planners[rows] = Planner(backend, config, tokenizer, decoder=settings, schema=schema)
    assert planners[65].constraints is not None and planners[65].describe()["typed_slots"] is True
    older = planners[0]
    assert older.constraints is None and older.describe()["typed_slots"] is False
    assert not older.backend.constrains_tokens  # type: ignore[attr-defined]
    assert older.backend._slots is None and older.backend.max_slot_classes is None  # type: ignore[attr-defined]
    older.backend.prefill(Prompt(np.arange(10, 30)))
    with pytest.raises(TrtUnsupportedError, match="no allowed_table / token_class inputs"):
        older.backend.step(np.ones((1, 1), dtype=np.int64), 20, mode=AttentionMode.CAUSAL, write_kv=False,
                           allowed=AllowedTokens(np.ones((1, spec["vocab_size"]), bool), np.zeros((1, 1), int)))


class _VisionEngine:
    """An ``ICudaEngine`` stand-in for one vision graph: static ``patches -> features``; counts its runs."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.io = {v["name"]: tuple(v["shape"]) for v in graph["inputs"] + graph["outputs"]}
        self.names, self.num_io_tensors, self.device_memory_size_v2 = list(self.io), 2, 1024
        self.runs = 0

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "patches" else "output"

    def get_tensor_dtype(self, name: str) -> str:
        return "DataType.FLOAT"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name]

    def create_execution_context(self) -> Any:
        def run(stream: int) -> bool:
            self.runs += 1
            return True

        return SimpleNamespace(execute_async_v3=run, set_tensor_address=lambda name, ptr: True)


def test_each_frame_runs_the_vision_engine_of_its_size(sized_onnx_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.formats.onnx_spec import load_spec, vision_graphs
    from blockpilot.runtime.ort_backend import OrtBackend

    spec = load_spec(sized_onnx_dir)
    graphs = {tuple(g["grid_thw"]): g for g in vision_graphs(spec["vision"])}
    assert set(graphs) == {(1, 8, 8), (1, 4, 10)}
    memory = _Memory()
    vision = {f"{g[1]}x{g[2]}.engine": _VisionEngine(graph) for g, graph in graphs.items()}
    _load_standins(monkeypatch, {"lm.engine": _Engine(spec, memory, key_end_on_host=True), **vision})
    for name in ["lm.engine", *vision]:
        (tmp_path / name).write_bytes(b"")
    engines = {g: tmp_path / f"{g[1]}x{g[2]}.engine" for g in graphs}
    backend = TrtBackend(tmp_path / "lm.engine", sized_onnx_dir, memory=memory,  # type: ignore[arg-type]
                         vision_engine=engines)
    ort = OrtBackend(sized_onnx_dir)
    assert backend.image_policy is not None and ort.image_policy is not None
    assert backend.image_policy.sizes == ort.image_policy.sizes == ((112, 112), (56, 140))
    image_id = spec["image_token_id"]
    rng = np.random.default_rng(0)
    # nuScenes (exported), the reference camera (exported), WOD 3:2 (nearest in aspect: 112x112), a 3:1 crop
    # (nearest: 140x56): the engine each runs on
    frames = {(900, 1600): "4x10", (112, 112): "8x8", (1280, 1920): "8x8", (300, 900): "4x10"}
    for (h, w), grid in frames.items():
        target = backend.image_policy.target_size(h, w)
        assert target == ort.image_policy.target_size(h, w)  # one shared choice
        tokens = (target[0] // 28) * (target[1] // 28)
        before = {n: e.runs for n, e in vision.items()}
        backend.prefill(Prompt(np.array([10, *([image_id] * tokens), 11]),
                               (rng.integers(0, 255, (h, w, 3), dtype=np.uint8),)))
        assert {n: e.runs - before[n] for n, e in vision.items()} == {n: int(n == f"{grid}.engine") for n in vision}

    single = TrtBackend(tmp_path / "lm.engine", sized_onnx_dir, memory=memory,  # type: ignore[arg-type]
                        vision_engine=tmp_path / "8x8.engine")  # one path: the first exported size's engine
    assert single.image_policy is not None and single.image_policy.sizes == ((112, 112),)
    single.prefill(Prompt(np.array([10, *([image_id] * 16), 11]), (rng.integers(0, 255, (900, 1600, 3),
                                                                                 dtype=np.uint8),)))
    assert vision["8x8.engine"].runs == 3  # resized to the one engine's size
    with pytest.raises(PlannerSetupError, match=r"patch grids \[\(1, 6, 6\)\]"):
        TrtBackend(tmp_path / "lm.engine", sized_onnx_dir, memory=memory,  # type: ignore[arg-type]
                   vision_engine={(1, 6, 6): tmp_path / "8x8.engine"})


def test_bundle_vision_engines_one_per_exported_size(rtx_bundle: Bundle) -> None:
    from blockpilot.formats.onnx_spec import load_spec
    from blockpilot.runtime.trt_vision import bundle_vision_engines

    chosen = select_engines(rtx_bundle, "8.9")
    files = bundle_vision_engines(rtx_bundle, chosen["vision"])
    assert isinstance(files, dict) and set(files) == {(1, 8, 8), (1, 4, 10)}
    assert len(set(files.values())) == 2 and all(p.is_file() for p in files.values())
    lm = chosen["lm_step"]
    network = json.loads(rtx_bundle.file(next(f for f in lm.extra_files if f.endswith(".network.json")))
                         .read_text())
    inputs = {i["name"]: (i["shape"], i["dtype"]) for i in network["inputs"]}
    spec_dir = rtx_bundle.file(next(a for a in rtx_bundle.graphs("decomposed") if a.role == "lm_step").path).parent
    vocab = load_spec(spec_dir)["vocab_size"]
    assert inputs["allowed_table"] == ([-1, vocab], "BOOL") and inputs["token_class"] == ([1, -1], "INT64")
    assert lm.io["build"]["profiles"]["allowed_table"][2] == [65, vocab]

    # verify --backend tensorrt compares each vision engine with the graph of its grid, on frames of its size.
    from blockpilot.export.verify_trt import _vision_jobs
    from blockpilot.runtime.trt_vision import artifact_grid

    observations = [observation(f) for f in heldout_keyframes(1, stride=12)[:2]]
    jobs = _vision_jobs(rtx_bundle, chosen["vision"], load_spec(spec_dir), observations)
    assert sorted(artifact_grid(engine) for _, _, engine, _ in jobs) == [(1, 4, 10), (1, 8, 8)]
    for _, graph, engine, feeds in jobs:
        grid = artifact_grid(engine)
        assert grid is not None and artifact_grid(graph) == grid and graph.kind == "graph"
        assert feeds and all(f["patches"].shape[0] == grid[0] * grid[1] * grid[2] for f in feeds)


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
@pytest.mark.parametrize("api", ["cuda-python", "cuda-core"])
def test_cuda_memory_round_trip_and_graph_replay(gpu_cc: str, api: str) -> None:
    with CudaMemory(api=api) as memory:
        assert memory.api == api and memory.compute_capability == gpu_cc
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
        memory.memset(b)
        memory.copy_2d(b, a, width=8, height=4, dst_pitch=32, src_pitch=16)  # 4 rows of 8 bytes, re-pitched
        memory.download(back, b)
        memory.synchronize()
        want = np.zeros(data.nbytes, np.uint8)
        for row in range(4):
            want[32 * row:32 * row + 8] = data.view(np.uint8)[16 * row:16 * row + 8]
        np.testing.assert_array_equal(back.view(np.uint8), want)
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


@pytest.mark.gpu
def test_fp16_engines_keep_an_fp16_cache_and_older_fp32_cache_engines_still_run(
        tmp_path_factory: pytest.TempPathFactory, gpu_cc: str) -> None:
    """An fp16 bundle's LM engine takes its cache in fp16 (half the device bytes); an fp16 engine built the way
    exports did before (fp32 cache I/O, a Cast at the boundary) still loads and runs on the same backend, reading
    its dtype from the engine, and both predict (nearly) the same tokens."""
    from blockpilot.export.fp16_graph import to_fp16_graph
    from blockpilot.export.trt_build import build_engine, load_tensorrt, profiles_from_spec
    from blockpilot.formats.onnx_spec import load_spec
    from blockpilot.runtime.trt_backend import engine_flavor
    from blockpilot.runtime.trt_vision import bundle_vision_engines

    tmp = tmp_path_factory.mktemp("gpu16cache")
    path = _engine_bundle(tmp, gpu_cc, "fp16")
    bundle = load_bundle(path)
    chosen = select_engines(bundle, gpu_cc)
    lm, vision = chosen["lm_step"], chosen.get("vision")
    assert lm.io["kv_cache"]["dtype"] == "float16"
    graphs_dir = bundle.file(next(a for a in bundle.graphs(variant="decomposed") if a.role == "lm_step").path).parent
    flavor = engine_flavor(lm)
    trt = load_tensorrt(prefer=(flavor,))
    old = tmp / "old.fp16.engine"
    to_fp16_graph(graphs_dir / "lm_step.onnx", tmp / "old.fp16.onnx")  # no fp16_io: the engine I/O stays fp32
    build_engine(tmp / "old.fp16.onnx", old, profiles=profiles_from_spec(load_spec(graphs_dir), "lm_step"),
                 compute_capability=gpu_cc if trt.is_rtx else None, trt=trt)
    planner = planner_from_bundle(path, decoder=DecoderSettings(name="scaffold"))
    prompt, _ = planner.prompt(observation(heldout_keyframes(1, stride=12)[0]))
    block = np.full((1, 32), planner.config.tokens.mask, dtype=np.int64)
    runs, sizes = [], {}
    for engine, plugin in ((bundle.file(lm.path), lm.variant == "plugin"), (old, False)):
        with TrtBackend(engine, graphs_dir, flavor=flavor, plugin=plugin,
                        vision_engine=None if vision is None else bundle_vision_engines(bundle, vision)) as be:
            sizes[str(be.cache_dtype)] = be.cache_bytes
            out = [be.prefill(prompt)]
            n = be.length
            out.append(be.step(block, n, mode=AttentionMode.CAUSAL, write_kv=True))
            out.append(be.step(block, be.length, mode=AttentionMode.BIDIRECTIONAL, write_kv=False))
            runs.append(np.concatenate([r.top1.reshape(-1) for r in out]))
    assert sizes["float32"] == 2 * sizes["float16"], sizes
    agreement = float((runs[0] == runs[1]).mean())
    print(f"fp16 cache vs fp32 cache top1 agreement {agreement:.2%}; cache bytes {sizes}")
    assert agreement >= 0.9
