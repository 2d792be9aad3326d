"""Packaging by role (issue 17 item 2): what each extra installs, that a Jetson keeps its own torch, that the runtime
extras resolve for aarch64, and that the car's paths run without torch.

The pip tests resolve against the package index pip is configured with (``--dry-run --report``: nothing is
installed but the locally built stand-in torch wheel, into a fresh venv without ``--system-site-packages``), so
they need that index, as ``scripts/setup.sh`` does. A resolve takes 2 to 15 s. In the default run: the JetPack torch
venv (all runtime extras in one resolve) and the aarch64 resolve for CPython 3.10 (JetPack 6); ``slow``
(``bash scripts/test.sh -m slow``): the same for CPython 3.12 (JetPack 7) and the ``plugin`` extra's aarch64
resolves (torch + Triton, 20 to 30 s each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from blockpilot.vla.reference_model import SHIPPED_MODEL

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
JETPACK_TORCH = "2.5.0a0+872d972e41.nv24.08"  # JetPack 6.1's torch build, as NVIDIA versions it
BASE = {"numpy", "onnx", "onnxruntime", "tokenizers", "pillow", "cryptography"}
# What a car may install: none of these may replace the torch a Jetson already holds.
RUNTIME_EXTRAS = ("trt-runtime", "plugin", "ros", "eval", "bags")
# Ubuntu 22.04 (JetPack 6) and 24.04 (JetPack 7) have glibc 2.35 / 2.39: every manylinux tag up to 2.35 installs.
# manylinux2014 alone (glibc 2.17) is not enough: onnxruntime's aarch64 wheels are manylinux_2_27/2_28 since 1.17.
AARCH64 = ["--platform", "manylinux2014_aarch64",
           *(arg for v in range(17, 36) for arg in ("--platform", f"manylinux_2_{v}_aarch64"))]
EGO = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _closure(extra: str) -> list[Requirement]:
    """The requirements ``blockpilot[extra]`` brings, its own self-references (``blockpilot[torch]``) followed."""
    out, pending, seen = [], [extra], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in _requirements(name):
            if req.name == "blockpilot":
                pending.extend(req.extras)
            else:
                out.append(req)
    return out


def test_the_base_install_is_what_a_car_needs_and_no_torch() -> None:
    assert {r.name.lower() for r in _requirements()} == BASE
    extras = PYPROJECT["project"]["optional-dependencies"]
    roles = {"trt-runtime", "trt-build", "plugin", "torch", "quant", "export", "eval", "ros", "sim", "robot", "dev"}
    assert roles <= set(extras)
    for extra in extras:  # pins live in constraints files: metadata holds ranges only
        assert not [str(r) for r in _closure(extra) if any(s.operator in ("==", "===") for s in r.specifier)], extra
    torch_in = {extra for extra in extras if any(r.name == "torch" for r in _closure(extra))}
    assert torch_in == {"torch", "plugin", "export", "quant", "robot", "dev", "kernels"}
    assert not any(r.name == "torch" for r in _closure("trt-runtime") + _closure("trt-build") + _closure("ros"))


def test_version_ranges_keep_jetpack_torch_and_fit_cuda_12_6_and_13() -> None:
    (torch,) = [r for r in _requirements("torch") if r.name == "torch"]
    assert torch.specifier.contains(JETPACK_TORCH, prereleases=True)
    assert not SpecifierSet(">=2.5").contains(JETPACK_TORCH, prereleases=True)  # why the floor is a pre-release
    (cuda,) = _requirements("trt-runtime")
    assert cuda.name == "cuda-python"
    assert [v for v in ("12.5.0", "12.6.0", "12.9.10", "13.0.0", "13.4.4", "14.0.0") if cuda.specifier.contains(v)] \
        == ["12.6.0", "12.9.10", "13.0.0", "13.4.4"]
    jetpack6 = _constraints("constraints-jetpack6.txt")
    assert not SpecifierSet(jetpack6["cuda-python"]).contains("13.0.0")
    assert SpecifierSet(jetpack6["cuda-python"]).contains("12.6.0")
    assert "torch" not in jetpack6 and "torch" not in _constraints("constraints-jetpack7.txt")
    (rtx,) = [r for r in _requirements("trt-build") if r.name == "tensorrt-rtx-cu13"]
    assert rtx.marker is not None and not rtx.marker.evaluate({"platform_machine": "aarch64"})
    workstation = _constraints("constraints.txt")
    assert workstation["nvidia-modelopt"] == "==0.47.0" and workstation["torch"] == "==2.13.0"


def _constraints(name: str) -> dict[str, str]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            req = Requirement(text)
            out[req.name.lower()] = str(req.specifier)
    return out


# ---- pip against the index --------------------------------------------------------------------------------------


def _pip(*args: str, python: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", *(["--python", str(python)] if python else []), *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the clean venv sees only what it holds
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The blockpilot wheel of this checkout and a stand-in ``torch`` wheel versioned as JetPack's, built offline."""
    root = tmp_path_factory.mktemp("wheels")
    src = root / "blockpilot-src"  # a copy, so the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "blockpilot", src / "blockpilot", ignore=shutil.ignore_patterns("__pycache__"))
    fake = root / "torch-src"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(f"__version__ = {JETPACK_TORCH!r}\n")
    (fake / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=68"]\n'
                                         'build-backend = "setuptools.build_meta"\n'
                                         f'[project]\nname = "torch"\nversion = "{JETPACK_TORCH}"\n')
    out = root / "dist"
    for tree in (src, fake):
        _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(out), str(tree))
    (blockpilot,) = out.glob("blockpilot-*.whl")
    (torch,) = out.glob("torch-*.whl")
    return {"blockpilot": blockpilot, "torch": torch}


def _resolve(*args: str, report: Path, python: Path | None = None) -> dict[str, str]:
    """``pip install --dry-run``: name -> version of what pip would install."""
    _pip("install", "--quiet", "--dry-run", "--report", str(report), *args, python=python)
    data: dict[str, Any] = json.loads(report.read_text())
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in data["install"]}


def test_a_venv_keeps_its_jetpack_torch_through_every_runtime_extra(wheels: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "car"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    _pip("install", "--quiet", "--no-index", str(wheels["torch"]), python=python)
    listed = json.loads(_pip("list", "--format", "json", python=python).stdout)
    assert {p["name"]: p["version"] for p in listed} == {"torch": "2.5.0a0+872d972e41.nv24.8"}  # PEP 440 form
    # All runtime extras at once: a requirement any one of them adds is in the union, so one resolve covers each.
    plan = _resolve(f"{wheels['blockpilot']}[{','.join(RUNTIME_EXTRAS)}]", report=tmp_path / "r.json", python=python)
    assert "torch" not in plan, f"pip would replace JetPack's torch with {plan.get('torch')}"
    assert {"blockpilot", "triton", "cuda-python", "onnxruntime", "matplotlib", "ros-rclpy"} <= set(plan)
    # The check can fail: a `torch>=2.5` requirement (what pyproject.toml had) would replace the JetPack build.
    control = _resolve("--no-deps", "torch>=2.5", report=tmp_path / "c.json", python=python)
    assert "torch" in control


@pytest.mark.parametrize("python_version", ["3.10", pytest.param("3.12", marks=pytest.mark.slow)])
def test_b_runtime_extras_resolve_for_aarch64(wheels: dict[str, Path], tmp_path: Path, python_version: str) -> None:
    target = ["--ignore-installed", *AARCH64, "--python-version", python_version, "--only-binary=:all:",
              "--target", str(tmp_path / "target")]
    plan = _resolve(*target, f"{wheels['blockpilot']}[trt-runtime,eval,bags]", report=tmp_path / "r.json")
    assert BASE | {"cuda-python", "matplotlib", "mcap", "rosbags"} <= set(plan) and "torch" not in plan
    assert plan["cuda-python"].startswith("13.")  # no constraint: the newest, for JetPack 7's CUDA 13
    if python_version == "3.10":  # JetPack 6: CUDA 12.6 drivers need cuda-python 12
        jp6 = _resolve(*target, "-c", str(REPO / "constraints-jetpack6.txt"), f"{wheels['blockpilot']}[trt-runtime]",
                       report=tmp_path / "jp6.json")
        assert jp6["cuda-python"].startswith("12.") and jp6["cuda-bindings"].startswith("12.")


@pytest.mark.slow
@pytest.mark.parametrize("python_version", ["3.10", "3.12"])
def test_b_plugin_extra_resolves_for_aarch64(wheels: dict[str, Path], tmp_path: Path, python_version: str) -> None:
    plan = _resolve("--ignore-installed", *AARCH64, "--python-version", python_version, "--only-binary=:all:",
                    "--target", str(tmp_path / "target"), f"{wheels['blockpilot']}[plugin]", report=tmp_path / "r.json")
    assert {"torch", "triton"} <= set(plan)


# ---- the car's paths without torch ------------------------------------------------------------------------------

# Makes torch unimportable, as on a car without it; the modules loaded are written at exit (after sys.exit too).
CAR = """import atexit, json, os, sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
if os.environ["BP_BLOCK_TORCH"] == "1":
    sys.meta_path.insert(0, _NoTorch())
atexit.register(lambda: open(os.environ["BP_MODULES"], "w").write(json.dumps(sorted(sys.modules))))
"""


def _car(code: str, tmp_path: Path, *, block_torch: bool) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    modules = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    env = {**os.environ, "BP_MODULES": str(modules), "BP_BLOCK_TORCH": "1" if block_torch else "0"}
    done = subprocess.run([sys.executable, "-c", CAR + code], capture_output=True, text=True, timeout=240, env=env)
    return done, set(json.loads(modules.read_text()))


def _cli(tmp_path: Path, *args: str, block_torch: bool = True) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    return _car(f"from blockpilot.cli import main\nsys.exit(main({list(args)!r}))\n", tmp_path, block_torch=block_torch)


@pytest.fixture(scope="module")
def bundle(shipped_bundle: Path) -> Path:
    return shipped_bundle  # tests/conftest.py


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("cam") / "front.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(path)
    return path


def test_c_plan_from_a_bundle_on_onnxruntime_imports_no_torch(bundle: Path, camera: Path, tmp_path: Path) -> None:
    for block_torch in (False, True):  # torch installed but never imported; torch absent
        done, modules = _cli(tmp_path, "plan", "--checkpoint", str(bundle), "--image", str(camera), "--ego", EGO,
                             block_torch=block_torch)
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["waypoints"]) > 0
        assert "torch" not in modules and "onnxruntime" in modules
    done, modules = _cli(tmp_path, "inspect", str(bundle), block_torch=False)
    assert done.returncode == 0 and "lm_step" in done.stdout and "torch" not in modules


def test_c_the_tensorrt_backend_gets_to_the_gpu_without_torch(bundle: Path, camera: Path, tmp_path: Path) -> None:
    """Here there is no GPU (or no engine for it): the planner is built up to where TensorRT and CUDA are needed,
    and the error names those, never torch."""
    done, modules = _cli(tmp_path, "plan", "--checkpoint", str(bundle), "--image", str(camera), "--ego", EGO,
                         "--backend", "tensorrt", block_torch=False)
    assert done.returncode == 2 and "torch" not in modules, done.stderr
    assert "blockpilot.runtime.trt_backend" in modules
    assert ("GPU" in done.stderr or "engine" in done.stderr) and "torch" not in done.stderr


def test_c_ros_planner_node_opens_a_bundle_without_torch(bundle: Path, tmp_path: Path) -> None:
    code = f"""
from blockpilot.ros_nodes.planner_node import PlannerNode
from blockpilot.ros_nodes.params import PlannerParams
from blockpilot.runtime.sources import open_planner
from blockpilot.eval.synthetic import heldout_keyframes, observation
params = PlannerParams(bundle={str(bundle)!r})
planner = open_planner(params.model_path, **params.planner_options())  # what PlannerNode._load_planner does
plan = planner.plan(observation(heldout_keyframes(1)[0]))
assert plan.error is None, plan.error
print(type(planner.backend).__name__)
"""
    for block_torch in (False, True):
        done, modules = _car(code, tmp_path, block_torch=block_torch)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["OrtBackend"]
        assert "torch" not in modules and "rclpy" in modules


@pytest.mark.parametrize(("args", "extra"), [
    (["plan", "--checkpoint", str(SHIPPED_MODEL), "--image", "IMAGE", "--ego", EGO], "torch"),
    (["train-reference", "--out", "OUT"], "torch"),
    (["train-robot", "--out", "OUT"], "torch"),
    (["export", "--checkpoint", str(SHIPPED_MODEL), "--out", "OUT"], "export"),
    (["bench", "--out", "OUT/bench.json"], "torch"),
    (["demo", "--out", "OUT"], "export"),
    (["scaffold"], "torch"),
])
def test_c_commands_that_need_torch_name_the_extra(args: list[str], extra: str, camera: Path, tmp_path: Path) -> None:
    args = [a.replace("OUT", str(tmp_path / "out")).replace("IMAGE", str(camera)) for a in args]
    done, modules = _cli(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"pip install 'blockpilot[{extra}]'" in done.stderr, done.stderr
    assert "torch" not in modules and not (tmp_path / "out").exists()


def test_c_every_command_parses_and_helps_without_torch(tmp_path: Path) -> None:
    done, modules = _cli(tmp_path, "--help")
    assert done.returncode == 0 and "train-reference" in done.stdout and "torch" not in modules
