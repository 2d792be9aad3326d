"""Stages that cannot fit refuse up front, naming the memory they need and what is available."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockpilot.cli import main
from blockpilot.vla.checkpoint import CheckpointError
from blockpilot.vla.loader import load_model
from blockpilot.vla.memory_budget import (
    AVAILABLE_ENV,
    RUNTIME_BYTES,
    STAGE_FACTORS,
    MemoryBudgetError,
    available_bytes,
    check_fits,
    checkpoint_parameters,
    estimate_bytes,
)

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"


def test_parameters_come_from_the_headers_and_match_the_model() -> None:
    model = load_model(REFERENCE)
    stored = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    assert checkpoint_parameters(REFERENCE) == sum(stored.values())
    need = estimate_bytes(REFERENCE, ("load", "export"), "float32")
    assert need == int(RUNTIME_BYTES + sum(stored.values()) * 4 * STAGE_FACTORS["export"])


def test_meminfo_is_read_and_the_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AVAILABLE_ENV, raising=False)
    found = available_bytes()
    assert found is None or found > 0
    monkeypatch.setenv(AVAILABLE_ENV, "12345")
    assert available_bytes() == 12345
    monkeypatch.setenv(AVAILABLE_ENV, "lots")
    with pytest.raises(MemoryBudgetError, match=AVAILABLE_ENV):
        available_bytes()


def test_load_refuses_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AVAILABLE_ENV, str(100 << 20))
    with pytest.raises(MemoryBudgetError, match=r"loading in float32 of .*reference needs about 0\.\d GB .* but only "
                                                r"0\.1 GB is available here \(\$BLOCKPILOT_MEMORY_AVAILABLE\)"):
        load_model(REFERENCE)
    assert issubclass(MemoryBudgetError, CheckpointError)
    monkeypatch.setenv(AVAILABLE_ENV, "0")  # disabled
    assert check_fits(REFERENCE, ("engines",)) is None
    assert load_model(REFERENCE) is not None


def test_export_refuses_up_front_and_the_cli_reports_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    need = estimate_bytes(REFERENCE, ("export",))
    monkeypatch.setenv(AVAILABLE_ENV, str(need - 1))  # enough to load, not to export
    assert check_fits(REFERENCE, ("load",)) is not None
    assert main(["export", "--checkpoint", str(REFERENCE), "--out", str(tmp_path / "bundle"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "blockpilot export of" in err and f"x {STAGE_FACTORS['export']} for export" in err
    assert "is available here" in err
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.iterdir())


def test_export_estimate_follows_the_held_dtype_and_the_graph_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 checkpoint exports holding bf16 (half the fp32 need); a traced graph over 2 GB streams its weights, so
    the 3B shape (3.75 B parameters, 7.5 GB of bf16) is estimated at about 15 GB, not the 53 GB of a float32 model at
    the inline factor; engine builds count the float32 graphs whatever the held dtype."""
    import blockpilot.vla.memory_budget as budget

    params = 3_754_622_976  # the 3b scale shape (Qwen2.5-VL-3B)
    monkeypatch.setattr(budget, "checkpoint_parameters", lambda _: params)
    bf16 = estimate_bytes("3b", ("export",), "bfloat16")
    assert bf16 == int(RUNTIME_BYTES + params * 2 * budget.EXPORT_EXTERNAL_FACTOR)
    assert 14e9 < bf16 < 16e9 < estimate_bytes("3b", ("export",), "float32")
    assert estimate_bytes("3b", ("engines",), "bfloat16") == estimate_bytes("3b", ("engines",), "float32")
    monkeypatch.setattr(budget, "checkpoint_parameters", lambda _: 494_032_768)  # 0.5b: a graph under 2 GB
    assert estimate_bytes("0.5b", ("export",), "bfloat16") == int(RUNTIME_BYTES + 494_032_768 * 2
                                                                  * STAGE_FACTORS["export"])


def test_quantize_refuses_up_front_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(AVAILABLE_ENV, "1000")
    out = tmp_path / "q"
    rc = main(["quantize", "--checkpoint", str(REFERENCE), "--recipe", "fp8", "--calib", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "quantize --recipe fp8" in err and "needs about" in err, err
    assert "x 1.1 for quantize + 2.4 GB" in err or "for load" in err, err
    assert not out.exists()


def test_verify_refuses_before_loading_either_planner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpilot.export.bundle_export import export_bundle
    from blockpilot.export.verify import verify_bundle

    bundle = tmp_path / "bundle"
    export_bundle(REFERENCE, bundle)
    monkeypatch.setenv(AVAILABLE_ENV, "1000")
    with pytest.raises(MemoryBudgetError, match=r"verify \(ONNX Runtime against torch float32\).*for the bundle's "
                                                 r"ONNX Runtime session"):
        verify_bundle(bundle, REFERENCE, samples=1, backend="onnxruntime")
