"""tegrastats lines of real Orin and Thor boards, window summaries, and the recorder around a real child process
(a small Python script printing sample lines, standing in for tegrastats)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from jetson_samples import (
    TEGRA_AGX_ORIN_DLA,
    TEGRA_AGX_ORIN_IDLE,
    TEGRA_AGX_ORIN_JP6,
    TEGRA_AGX_ORIN_MAXAVG,
    TEGRA_ORIN_NANO,
    TEGRA_ORIN_NX,
    TEGRA_ORIN_OFFLINE_CORES,
    TEGRA_THOR_IDLE_NEGATIVE,
    TEGRA_THOR_JP71,
    TEGRA_THOR_JP72,
)

from blockpilot.jetson.tegrastats import (
    Stat,
    TegrastatsError,
    TegrastatsMissingError,
    TegrastatsRecorder,
    parse_line,
    summarize,
)


def test_agx_orin_jetpack6() -> None:
    s = parse_line(TEGRA_AGX_ORIN_JP6)
    assert s.timestamp == "05-09-2026 18:42:06"
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (18207, 62841, 86)
    assert len(s.cpu_percent) == 12 and s.cpu_percent[:2] == (14.0, 5.0) and s.cpu_mhz[0] == 2188
    assert (s.gpu_percent, s.gpu_mhz) == (0.0, (0, 0))
    assert s.temperatures_c == {"cpu": 52.562, "soc2": 48.437, "soc0": 49.093, "tj": 52.562, "soc1": 49.656}
    assert s.power_mw == {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707}


def test_agx_orin_upper_case_sensors_dla_and_off_sensors() -> None:
    dla = parse_line(TEGRA_AGX_ORIN_DLA)
    assert (dla.gpu_percent, dla.gpu_mhz) == (14.0, (407, 407))
    assert dla.temperatures_c["CPU"] == 77.281 and dla.temperatures_c["Tboard"] == 62.0
    assert dla.power_mw["VDD_CPU_CV"] == 14312 and dla.power_mw["VDDQ_VDD2_1V8AO"] == 1091
    idle = parse_line(TEGRA_AGX_ORIN_IDLE)
    assert "GPU" not in idle.temperatures_c and "CV0" not in idle.temperatures_c  # -256C: sensor off
    assert "NC" not in idle.power_mw and idle.power_mw["VDDQ_VDD2_1V8AO"] == 301
    maxavg = parse_line(TEGRA_AGX_ORIN_MAXAVG)
    assert maxavg.temperatures_c["cpu"] == 47.906  # current, not the max after the slash
    assert maxavg.power_mw == {"VDD_GPU_SOC": 3034, "VDD_CPU_CV": 1137, "VIN_SYS_5V0": 4939}
    assert maxavg.gpu_percent == 0.0 and maxavg.gpu_mhz == ()


def test_orin_nano_and_nx() -> None:
    nano = parse_line(TEGRA_ORIN_NANO)
    assert (nano.gpu_percent, nano.gpu_mhz, nano.ram_total_mb) == (62.0, (612,), 7620)
    assert nano.power_mw == {"VDD_IN": 4541, "VDD_CPU_GPU_CV": 521, "VDD_SOC": 1446}
    assert nano.temperatures_c["gpu"] == 50.0
    nx = parse_line(TEGRA_ORIN_NX)
    assert nx.gpu_percent == 7.0 and nx.cpu_percent[-1] == 100.0 and nx.temperatures_c["cv2"] == 54.656
    off = parse_line(TEGRA_ORIN_OFFLINE_CORES)
    assert off.cpu_percent == (None, None) and off.cpu_mhz == (None, None)


def test_thor_formats() -> None:
    jp71 = parse_line(TEGRA_THOR_JP71)
    assert jp71.gpu_percent is None and jp71.gpu_mhz == (314, 314, 314)  # frequencies per GPC, no utilisation
    assert jp71.power_mw == {"VDD_GPU": 1962, "VDD_CPU_SOC_MSS": 5887, "VIN_SYS_5V0": 5635, "VIN": 19780}
    assert jp71.temperatures_c == {"cpu": 37.343, "tj": 38.875, "soc012": 37.468, "gpu": 38.875, "soc345": 37.406}
    assert len(jp71.cpu_percent) == 14
    jp72 = parse_line(TEGRA_THOR_JP72)
    assert jp72.gpu_percent is None and jp72.gpu_mhz == ()  # JetPack 7.2 drops GR3D_FREQ
    assert jp72.power_mw["VDD_GPU"] == 37528 and jp72.power_mw["VIN"] == 87426
    assert parse_line(TEGRA_THOR_IDLE_NEGATIVE).power_mw["VDD_GPU"] == -392


@pytest.mark.parametrize("line", ["", "hello world", "Traceback (most recent call last):"])
def test_non_tegrastats_lines(line: str) -> None:
    with pytest.raises(TegrastatsError, match="not a tegrastats line"):
        parse_line(line)


def test_summary_statistics_per_rail_and_sensor() -> None:
    samples = [parse_line(TEGRA_ORIN_NANO), parse_line(TEGRA_ORIN_NX), parse_line(TEGRA_ORIN_OFFLINE_CORES)]
    summary = summarize(samples, 3.0)
    assert summary.samples == 3
    assert summary.power_mw["VDD_IN"] == Stat((4541 + 12673 + 12000) / 3, 12673, 4541, 3)
    assert summary.temperature_c["cpu"].max == 58.937
    assert summary.temperature_c["cv0"].samples == 1  # a sensor only one board has
    assert summary.gpu_percent == Stat((62 + 7 + 0) / 3, 62, 0, 3)
    d = summary.to_dict()
    assert d["power_mw"]["VDD_SOC"] == {"mean": 2058.333, "max": 2608.0, "min": 1446.0, "samples": 3}  # type: ignore
    assert "VDD_IN" in summary.table() and "mean" in summary.table()
    thor = summarize([parse_line(TEGRA_THOR_JP71), parse_line(TEGRA_THOR_JP72)])
    assert thor.gpu_percent is None and thor.power_mw["VDD_GPU"].mean == (1962 + 37528) / 2


FAKE_TEGRASTATS = """
import sys, time
lines = {lines!r}
print("tegrastats: some banner the parser must skip", flush=True)
for i in range({count}):
    print(lines[i % len(lines)], flush=True)
    time.sleep({sleep})
time.sleep(30)  # like tegrastats: runs until stopped
"""


def fake_tegrastats(tmp_path: Path, lines: list[str], count: int, sleep: float = 0.01) -> list[str]:
    script = tmp_path / "fake_tegrastats.py"
    script.write_text(FAKE_TEGRASTATS.format(lines=lines, count=count, sleep=sleep))
    return [sys.executable, str(script)]


def wait_for(recorder: TegrastatsRecorder, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(recorder.samples()) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_recorder_runs_a_real_child_and_summarises(tmp_path: Path) -> None:
    command = fake_tegrastats(tmp_path, [TEGRA_THOR_JP71, TEGRA_THOR_JP72], count=6)
    with TegrastatsRecorder(command=command) as recorder:
        wait_for(recorder, 6)
        process = recorder._process
        assert process is not None and process.poll() is None
    assert process.poll() is not None  # stopped with the block, though the script would run on
    assert recorder.unparsed == 1  # the banner
    summary = recorder.summary()
    assert summary.samples == 6
    assert summary.power_mw["VDD_GPU"] == Stat((1962 + 37528) / 2, 37528, 1962, 6)
    assert summary.power_mw["VIN"].max == 87426
    assert summary.temperature_c["gpu"] == Stat((38.875 + 62.906) / 2, 62.906, 38.875, 6)
    assert summary.seconds >= 0


def test_recorder_window_keeps_only_samples_inside(tmp_path: Path) -> None:
    ticks = iter(range(1000))
    recorder = TegrastatsRecorder(command=fake_tegrastats(tmp_path, [TEGRA_ORIN_NANO], count=10),
                                  clock=lambda: float(next(ticks)))
    recorder.start()
    try:
        wait_for(recorder, 10)
    finally:
        recorder.stop()
    assert [t for t, _ in recorder.records] == [float(i) for i in range(1, 11)]  # tick 0: the banner's arrival
    window = recorder.summary(3.0, 6.0)
    assert window.samples == 4 and window.seconds == 3.0
    assert recorder.summary(100.0, 200.0).samples == 0
    recorder.stop()  # stopping twice is harmless


def test_recorder_command_and_errors(tmp_path: Path) -> None:
    assert TegrastatsRecorder(250).command == ["tegrastats", "--interval", "250"]
    with pytest.raises(ValueError, match="interval_ms must be positive"):
        TegrastatsRecorder(0)
    with pytest.raises(TegrastatsMissingError, match="tegrastats runs on a Jetson only"):
        TegrastatsRecorder(executable="tegrastats-not-installed-here").start()
    assert not TegrastatsRecorder.available("tegrastats-not-installed-here")
    recorder = TegrastatsRecorder(command=fake_tegrastats(tmp_path, [TEGRA_ORIN_NANO], count=1))
    with recorder, pytest.raises(TegrastatsError, match="already running"):
        recorder.start()


def test_wait_for_sample_gives_up_when_the_child_is_silent() -> None:
    recorder = TegrastatsRecorder(command=[sys.executable, "-c", "pass"])
    with recorder:
        started = time.monotonic()
        assert not recorder.wait_for_sample(timeout=20)
        assert time.monotonic() - started < 15  # the child exited: no need to wait out the timeout
