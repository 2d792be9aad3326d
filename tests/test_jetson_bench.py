"""The device benchmark: latency percentiles per stage over held-out observations, next to tegrastats power and
temperature; end to end through the CLI on the shipped reference model (on x86: latency only, or a fake
tegrastats on PATH)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jetson_samples import AGX_THOR, TEGRA_THOR_JP71, TEGRA_THOR_JP72, write_root

from blockpilot.cli import main
from blockpilot.jetson.bench import STAGES, JetsonBenchError, heldout_observations, latency_table, run_jetson_bench
from blockpilot.jetson.tegrastats import TegrastatsRecorder
from blockpilot.runtime.plan_types import Observation

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"


@dataclass
class FakeStats:
    stage_ms: dict[str, float]
    forwards: int = 7
    tokens_per_forward: float = 2.5


@dataclass
class FakePlan:
    stats: FakeStats
    plan: object | None = "parsed"


@dataclass
class FakePlanner:
    """Stage times 1, 2, ... ms per call (total = 10x), every third plan unparsed; optionally waits per plan."""

    sleep: float = 0.0
    calls: list[Any] = field(default_factory=list)

    def plan(self, observation: Any) -> FakePlan:
        self.calls.append(observation)
        time.sleep(self.sleep)
        n = float(len(self.calls))
        stages = {s: n for s in STAGES if s != "total"} | {"total": 10 * n}
        return FakePlan(FakeStats(stages), None if len(self.calls) % 3 == 0 else "parsed")


def test_latency_table_percentiles() -> None:
    table = latency_table({"total": [float(v) for v in range(1, 101)], "vision": [], "decode": [5.0]})
    assert set(table) == {"total", "decode"}
    assert table["total"] == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01, "mean": 50.5, "max": 100.0})
    assert table["decode"] == {"p50": 5.0, "p90": 5.0, "p99": 5.0, "mean": 5.0, "max": 5.0}


def test_run_jetson_bench_times_only_after_warmup() -> None:
    planner = FakePlanner()
    result = run_jetson_bench(planner, ["a", "b", "c", "d"], warmup=3, describe={"backend": "fake"})
    assert planner.calls == ["a", "b", "c", "a", "b", "c", "d"]  # warm-up cycles through the observations
    assert result.samples == 4 and result.warmup == 3
    assert result.latency_ms["total"]["max"] == 70.0 and result.latency_ms["prompt"]["p50"] == 5.5  # calls 4..7
    assert result.parsed == 3  # call 6 did not parse
    assert (result.forwards_per_plan, result.tokens_per_forward) == (7.0, 2.5)
    assert result.tegrastats is None and result.tegrastats_note == "not requested"
    text = result.table()
    assert "4 plans after 3 warm-up, 3 parsed; backend fake" in text and "not a Jetson" in text
    assert json.loads(json.dumps(result.to_dict()))["latency_ms"]["total"]["p99"] == pytest.approx(69.7)
    with pytest.raises(JetsonBenchError, match="no observations"):
        run_jetson_bench(planner, [])
    with pytest.raises(JetsonBenchError, match="warmup"):
        run_jetson_bench(planner, ["a"], warmup=-1)


FAKE_TEGRASTATS = f"""#!{sys.executable}
import sys, time
lines = {[TEGRA_THOR_JP71, TEGRA_THOR_JP72]!r}
i = 0
while True:
    print(lines[i % 2], flush=True)
    i += 1
    time.sleep(0.02)
"""


def fake_tegrastats_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "tegrastats"
    exe.write_text(FAKE_TEGRASTATS)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_run_jetson_bench_summarises_tegrastats_over_the_timed_window(tmp_path: Path) -> None:
    recorder = TegrastatsRecorder(command=[str(fake_tegrastats_bin(tmp_path) / "tegrastats")])
    planner = FakePlanner(sleep=0.1)
    result = run_jetson_bench(planner, list(range(4)), warmup=1, recorder=recorder,
                              platform={"module": "X", "l4t": "38.2.1"}, first_sample_timeout=20)
    assert recorder._process is None  # stopped by the benchmark
    summary = result.tegrastats
    assert summary is not None and summary.samples >= 2
    assert result.tegrastats_note == f"{summary.samples} samples in the window"
    assert summary.power_mw["VDD_GPU"].max == 37528 and summary.power_mw["VDD_GPU"].min == 1962
    assert summary.temperature_c["tj"].max == pytest.approx(63.281)
    assert len(recorder.samples()) > summary.samples  # warm-up samples are left out
    assert "VDD_CPU_SOC_MSS" in result.table() and "X (L4T 38.2.1)" in result.table()


def test_heldout_observations() -> None:
    observations = heldout_observations(10)
    assert len(observations) == 10 and all(isinstance(o, Observation) for o in observations)
    again = heldout_observations(10)
    assert all(np.array_equal(a.images[0], b.images[0]) for a, b in zip(observations, again, strict=True))
    assert len(heldout_observations(3)) == 3
    with pytest.raises(JetsonBenchError, match="at least 1"):
        heldout_observations(0)


def test_cli_bench_on_x86_records_latency_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = main(["jetson", "bench", "--checkpoint", str(REFERENCE), "--samples", "1", "--warmup", "0", "--tegrastats",
               "--root", str(write_root(tmp_path / "x86", None)), "--json-out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tegrastats absent: not a Jetson, latency only" in text and "device     not a Jetson" in text
    data = json.loads(out.read_text())
    assert data["samples"] == 1 and data["tegrastats"] is None and data["platform"] is None
    assert set(data["latency_ms"]) == set(STAGES)
    assert set(data["latency_ms"]["total"]) == {"p50", "p90", "p99", "mean", "max"}
    assert data["planner"]["backend"] == "torch (cpu)" and data["forwards_per_plan"] >= 2


def test_cli_bench_with_tegrastats_on_a_jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", f"{fake_tegrastats_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "bench.json"
    rc = main(["jetson", "bench", "--checkpoint", str(REFERENCE), "--samples", "1", "--warmup", "1", "--tegrastats",
               "--interval-ms", "20", "--root", str(write_root(tmp_path / "thor", AGX_THOR)), "--json-out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["platform"]["name"] == "thor" and data["platform"]["module"] == "Jetson AGX Thor T5000 128GB"
    power = data["tegrastats"]["power_mw"]
    assert set(power) == {"VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0", "VIN"}
    assert data["tegrastats"]["samples"] >= 1 and power["VIN"]["max"] in (19780, 87426)
    assert "tegrastats " in capsys.readouterr().out


def test_cli_bench_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:  # argparse's range check: one line, exit 2
        main(["jetson", "bench", "--checkpoint", str(REFERENCE), "--samples", "0"])
    assert exit_.value.code == 2 and "argument --samples: expected an integer >= 1" in capsys.readouterr().err
    assert main(["jetson", "bench", "--bundle", str(tmp_path / "missing"), "--root", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err


def test_run_jetson_bench_says_when_no_sample_fell_in_the_window() -> None:
    recorder = TegrastatsRecorder(command=[sys.executable, "-c", "pass"])
    result = run_jetson_bench(FakePlanner(), ["a"], warmup=0, recorder=recorder, first_sample_timeout=0.5)
    assert result.tegrastats is None
    assert result.tegrastats_note.startswith("running, but no sample fell inside the timed window")
