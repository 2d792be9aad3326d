"""Service files (issue 17 item 5): what a build user writes, the service user (jetson/blockpilot-planner.service)
must read. A bundle (graphs, TensorRT-RTX engines, weights, manifest, signature) and an eval run (results, report,
plots) come out 0644 files in 0755 directories less the umask (0640 / 0750 under 027), never tempfile's 0600 / 0700;
only the private signing key is 0600 whatever the umask."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_fixtures import torch_threads

from blockpilot.cli import main
from blockpilot.demo import SHIPPED_MODEL


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of every directory and file under it, by path relative to ``root``."""
    found = {".": root.stat().st_mode & 0o777}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[path.relative_to(root).as_posix()] = path.lstat().st_mode & 0o777
    return found


def assert_service_readable(root: Path, mask: int, *, expect: set[str]) -> None:
    found = modes(root)
    assert expect <= set(found), f"missing: {sorted(expect - set(found))}"
    wrong = {rel: oct(mode) for rel, mode in found.items()
             if mode != (0o755 if (root / rel).is_dir() else 0o644) & ~mask}
    assert not wrong, f"under umask {mask:03o}: {wrong}"


def test_bundle_and_report_modes_follow_the_umask(umask: int, tmp_path: Path) -> None:
    from blockpilot.sim.generator import generate_scene
    from blockpilot.sim.writers.nuscenes import write_nuscenes

    assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", "team"]) == 0
    assert (tmp_path / "keys" / "team.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "team.pub").stat().st_mode & 0o777 == 0o644 & ~umask
    bundle = tmp_path / "bundle"
    with torch_threads(1):
        assert main(["export", "--checkpoint", str(SHIPPED_MODEL), "--out", str(bundle), "--with-weights",
                     "--target", "rtx", "--attention", "decomposed", "--quiet",
                     "--sign", str(tmp_path / "keys" / "team.key")]) == 0
    assert_service_readable(bundle, umask, expect={
        "manifest.json", "manifest.sig", "model", "model/model.safetensors", "graphs/decomposed/lm_step.onnx",
        "engines/rtx", "engines/rtx/lm_step.fp16.decomposed.engine"})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left beside it
    root = write_nuscenes([generate_scene(1_000_321, duration_s=6.0)], tmp_path / "nus")
    run = tmp_path / "runs" / "eval"
    assert main(["eval", "--source", "nuscenes", "--dataroot", str(root), "--limit", "6", "--no-progress",
                 "--bundle", str(bundle), "--out", str(run), "--trusted-key", str(tmp_path / "keys" / "team.pub")]) == 0
    assert_service_readable(tmp_path / "runs", umask, expect={
        "eval/results.jsonl", "eval/report/metrics.json", "eval/report/summary.md", "eval/report/plots/latency.png"})
