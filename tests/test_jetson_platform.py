"""Jetson platform detection on sample device-tree, nv_tegra_release and dpkg outputs of real boards."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from jetson_samples import (
    AGX_ORIN_64GB,
    AGX_THOR,
    AGX_XAVIER,
    CUDA_VERSION_JSON,
    DPKG_ORIN_JP62,
    ORIN_NANO_SUPER,
    ORIN_NX_16GB,
    RASPBERRY_PI,
    write_root,
)

from blockpilot.export.targets import ENGINE_TARGETS
from blockpilot.jetson.commands import CommandResult, ToolMissingError
from blockpilot.jetson.platform import (
    RELEASES,
    L4TRelease,
    PlatformFileError,
    UnsupportedJetsonError,
    detect_platform,
    identify,
    module_part,
    parse_compatible,
    parse_dpkg_query,
    parse_nv_tegra_release,
    query_packages,
    release_facts,
)


class RecordingRunner:
    def __init__(self, stdout: str = "", returncode: int = 0, missing: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.stdout, self.returncode, self.missing = stdout, returncode, missing

    def __call__(self, args: Sequence[str], stdin: str | None) -> CommandResult:
        self.calls.append(tuple(args))
        if self.missing:
            raise ToolMissingError(args[0])
        return CommandResult(tuple(args), self.returncode, self.stdout)


def test_nv_tegra_release_lines() -> None:
    assert parse_nv_tegra_release(AGX_ORIN_64GB.release) == L4TRelease(36, 4, 3, "generic")
    assert parse_nv_tegra_release(AGX_THOR.release).version == "38.2.1"
    assert parse_nv_tegra_release("# R35 (release), REVISION: 4.1, GCID: 1, BOARD: t186ref\n").version == "35.4.1"
    assert parse_nv_tegra_release("\n# R39 (release), REVISION: 2\n").version == "39.2.0"


@pytest.mark.parametrize("text", ["", "R36 release 4.3", "# R36 (release), GCID: 1", "hello\n# R36 (release)"])
def test_malformed_release_file_is_named(text: str) -> None:
    with pytest.raises(PlatformFileError, match="/etc/nv_tegra_release: expected"):
        parse_nv_tegra_release(text)


def test_compatible_strings_and_module_parts() -> None:
    assert parse_compatible(AGX_ORIN_64GB.compatible) == ("nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005",
                                                          "nvidia,tegra234")
    assert module_part(parse_compatible(ORIN_NANO_SUPER.compatible)) == ("p3767-0005", True)
    assert module_part(parse_compatible(AGX_THOR.compatible)) == ("p3834-0008", False)
    assert module_part(("nvidia,p3767-0003", "nvidia,tegra234")) == ("p3767-0003", False)
    with pytest.raises(PlatformFileError, match="compatible: empty"):
        parse_compatible(b"\0\0")
    with pytest.raises(PlatformFileError, match="not UTF-8"):
        parse_compatible(b"\xff\xfe\0", "/proc/device-tree/compatible")


def test_agx_orin_64gb_from_the_matrix() -> None:
    p = identify(AGX_ORIN_64GB.compatible, AGX_ORIN_64GB.release, AGX_ORIN_64GB.model)
    assert p is not None
    assert (p.name, p.soc, p.sm, p.part) == ("orin", "tegra234", "8.7", "p3701-0005")
    assert p.module == "Jetson AGX Orin 64GB"
    assert p.model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert (p.l4t, p.jetpack, p.tensorrt, p.cuda) == ("36.4.3", "6.2", "10.3", "12.6")
    assert p.sources["tensorrt"] == "matrix L4T 36.4.3, verified"
    assert p.sm == ENGINE_TARGETS[p.name].sm
    assert not p.super_variant


def test_orin_nano_super_and_orin_nx() -> None:
    nano = identify(ORIN_NANO_SUPER.compatible, ORIN_NANO_SUPER.release, ORIN_NANO_SUPER.model)
    assert nano is not None and nano.super_variant
    assert (nano.module, nano.l4t, nano.jetpack, nano.tensorrt) == (
        "Jetson Orin Nano 8GB (developer kit module)", "36.4.7", "6.2.1", "10.3")
    nx = identify(ORIN_NX_16GB.compatible, ORIN_NX_16GB.release, ORIN_NX_16GB.model)
    assert nx is not None
    assert (nx.name, nx.module, nx.l4t, nx.jetpack) == ("orin", "Jetson Orin NX 16GB", "36.4.4", "6.2.1")
    assert nx.sources["tensorrt"] == "matrix L4T 36.4.4, unverified"  # 36.4.4's TensorRT is carried over


def test_agx_thor() -> None:
    p = identify(AGX_THOR.compatible, AGX_THOR.release, AGX_THOR.model)
    assert p is not None
    assert (p.name, p.soc, p.sm, p.module) == ("thor", "tegra264", "11.0", "Jetson AGX Thor T5000 128GB")
    assert (p.l4t, p.jetpack, p.tensorrt, p.cuda) == ("38.2.1", "7.0", "10.13", "13.0")
    assert p.sources["cuda"] == "matrix L4T 38.2.1, verified"
    assert p.sources["tensorrt"] == "matrix L4T 38.2.1, unverified"
    assert p.sm == ENGINE_TARGETS[p.name].sm


def test_installed_packages_and_cuda_json_win_over_the_matrix() -> None:
    p = identify(AGX_ORIN_64GB.compatible, AGX_ORIN_64GB.release, packages=parse_dpkg_query(DPKG_ORIN_JP62),
                 cuda_json=CUDA_VERSION_JSON)
    assert p is not None
    assert (p.jetpack, p.tensorrt, p.cuda) == ("6.2", "10.3.0.30", "12.6")
    assert p.sources == {"l4t": "/etc/nv_tegra_release", "jetpack": "dpkg nvidia-jetpack",
                         "tensorrt": "dpkg libnvinfer10", "cuda": "/usr/local/cuda/version.json"}
    assert p.notes == ()
    upgraded = identify(AGX_THOR.compatible, AGX_THOR.release, packages={"libnvinfer10": "10.14.1.48-1+cuda13.0"})
    assert upgraded is not None and upgraded.tensorrt == "10.14.1.48"
    assert any("differs from the matrix's 10.13" in n for n in upgraded.notes)


def test_unknown_and_nearest_releases() -> None:
    later = identify(AGX_ORIN_64GB.compatible, "# R36 (release), REVISION: 4.9, GCID: 1, BOARD: generic\n")
    assert later is not None and (later.jetpack, later.tensorrt) == ("6.2.1", "10.3")
    assert later.sources["tensorrt"] == "matrix L4T 36.4.7, unverified (nearest to 36.4.9)"
    future = identify(AGX_THOR.compatible, "# R40 (release), REVISION: 1.0, GCID: 1, BOARD: generic\n")
    assert future is not None and (future.l4t, future.jetpack, future.tensorrt, future.cuda) == ("40.1.0", None,
                                                                                                 None, None)
    assert any("40.1.0 is not in the version matrix" in n for n in future.notes)
    bare = identify(AGX_THOR.compatible, None)
    assert bare is not None and bare.l4t is None and any("missing" in n for n in bare.notes)
    from_dpkg = identify(AGX_ORIN_64GB.compatible, None, packages=parse_dpkg_query(DPKG_ORIN_JP62))
    assert from_dpkg is not None and (from_dpkg.l4t, from_dpkg.sources["l4t"]) == ("36.4.3", "dpkg nvidia-l4t-core")


def test_not_a_jetson_and_unsupported_jetsons() -> None:
    assert identify(RASPBERRY_PI, None) is None
    with pytest.raises(UnsupportedJetsonError, match=r"tegra194 \(Jetson Xavier\) is not a blockpilot target"):
        identify(AGX_XAVIER.compatible, AGX_XAVIER.release)


def test_version_matrix_is_consistent() -> None:
    seen = [tuple(map(int, r.l4t.split("."))) for r in RELEASES]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    for row in RELEASES:
        assert set(row.verified) <= {"jetpack", "tensorrt", "cuda"} and row.source
    assert release_facts(L4TRelease(36, 4, 3))[0].tensorrt == "10.3"  # type: ignore[union-attr]
    assert release_facts(L4TRelease(38, 4, 0))[0].jetpack == "7.1"  # type: ignore[union-attr]
    assert release_facts(L4TRelease(39, 2, 0))[0].tensorrt == "10.16"  # type: ignore[union-attr]
    assert release_facts(L4TRelease(38, 3, 0)) == (None, False)


def test_detect_platform_from_a_root(tmp_path: Path) -> None:
    root = write_root(tmp_path / "orin", AGX_ORIN_64GB, cuda_json=CUDA_VERSION_JSON)
    runner = RecordingRunner(DPKG_ORIN_JP62)
    p = detect_platform(root, runner=runner)
    assert p is not None and (p.module, p.tensorrt, p.cuda) == ("Jetson AGX Orin 64GB", "10.3.0.30", "12.6")
    assert runner.calls == [("dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n",
                             "nvidia-jetpack", "libnvinfer10", "nvidia-l4t-core")]
    assert detect_platform(root, runner=None).tensorrt == "10.3"  # type: ignore[union-attr]
    # dpkg absent or some packages not installed (exit 1): the matrix stands in, nothing fails.
    assert detect_platform(root, runner=RecordingRunner(missing=True)).tensorrt == "10.3"  # type: ignore[union-attr]
    partial = RecordingRunner("nvidia-jetpack\tii \t6.2+b77\n", returncode=1)
    assert detect_platform(root, runner=partial).jetpack == "6.2"  # type: ignore[union-attr]


def test_detect_platform_off_jetson(tmp_path: Path) -> None:
    runner = RecordingRunner()
    assert detect_platform(write_root(tmp_path / "x86", None), runner=runner) is None
    pi = tmp_path / "pi"
    (pi / "proc/device-tree").mkdir(parents=True)
    (pi / "proc/device-tree/compatible").write_bytes(RASPBERRY_PI)
    assert detect_platform(pi, runner=runner) is None
    assert runner.calls == []  # dpkg is asked only on a Jetson


def test_detect_platform_names_broken_files(tmp_path: Path) -> None:
    root = write_root(tmp_path / "thor", AGX_THOR)
    (root / "etc/nv_tegra_release").write_text("garbage\n")
    with pytest.raises(PlatformFileError, match=f"{root}/etc/nv_tegra_release: expected"):
        detect_platform(root, runner=None)
    (root / "etc/nv_tegra_release").write_text(AGX_THOR.release)
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text("{}")
    with pytest.raises(PlatformFileError, match=r"version\.json: expected JSON with cuda\.version"):
        detect_platform(root, runner=None)


def test_firmware_devicetree_fallback_and_dpkg_parsing(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "sys/firmware/devicetree/base").mkdir(parents=True)
    (root / "sys/firmware/devicetree/base/compatible").write_bytes(ORIN_NX_16GB.compatible)
    p = detect_platform(root, runner=None)
    assert p is not None and p.module == "Jetson Orin NX 16GB" and p.l4t is None
    text = "nvidia-jetpack\trc \t6.1+b123\nlibnvinfer10\tii \t10.3.0.30-1+cuda12.5\nbroken line\n"
    assert parse_dpkg_query(text) == {"libnvinfer10": "10.3.0.30-1+cuda12.5"}
    assert query_packages(RecordingRunner(missing=True)) == {}


def test_platform_describe_and_dict() -> None:
    p = identify(AGX_THOR.compatible, AGX_THOR.release, AGX_THOR.model)
    assert p is not None
    text = p.describe()
    assert "platform  thor (tegra264, sm 11.0)" in text and "tensorrt  10.13  [matrix L4T 38.2.1, unverified]" in text
    d = p.to_dict()
    assert d["name"] == "thor" and d["sources"]["cuda"].startswith("matrix")  # type: ignore[index]
