"""Power modes and clocks: nvpmodel output parsing on real samples, and the exact commands run (through a recording
runner) when a mode is set and restored, including the restore after a failure."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from jetson_samples import (
    NVPMODEL_AGX_ORIN,
    NVPMODEL_CONF_AGX_ORIN,
    NVPMODEL_CONF_ORIN_NANO_SUPER,
    NVPMODEL_ORIN_NANO_SUPER,
    NVPMODEL_REBOOT,
    NVPMODEL_THOR,
    NVPMODEL_WARN,
)

from blockpilot.cli import main
from blockpilot.jetson import cli as jetson_cli
from blockpilot.jetson.commands import CommandResult, ToolMissingError, run_command
from blockpilot.jetson.power import (
    PowerControl,
    PowerError,
    PowerMode,
    PowerStateError,
    RebootRequiredError,
    parse_nvpmodel_conf,
    parse_nvpmodel_query,
    performance_mode,
    read_state,
    restore_state,
    save_state,
)


class Board:
    """A recording runner that behaves like nvpmodel / jetson_clocks on one board: ``-m`` changes the mode."""

    def __init__(self, mode: int = 0, names: dict[int, str] | None = None,
                 fail: Callable[[tuple[str, ...]], CommandResult | None] | None = None) -> None:
        self.mode, self.names = mode, names or {0: "MAXN", 1: "MODE_15W", 2: "MODE_30W", 3: "MODE_50W"}
        self.calls: list[tuple[str, ...]] = []
        self.stdin: list[str | None] = []
        self.fail = fail

    def __call__(self, args: Sequence[str], stdin: str | None) -> CommandResult:
        call = tuple(args)
        self.calls.append(call)
        self.stdin.append(stdin)
        failed = self.fail(call) if self.fail else None
        if failed is not None:
            return failed
        if call[:2] == ("nvpmodel", "-q"):
            return CommandResult(call, 0, f"NV Power Mode: {self.names[self.mode]}\n{self.mode}\n")
        if call[:2] == ("nvpmodel", "-m"):
            self.mode = int(call[2])
        return CommandResult(call, 0)


def control(board: Board, tmp_path: Path, conf: str = NVPMODEL_CONF_AGX_ORIN) -> PowerControl:
    (tmp_path / "nvpmodel.conf").write_text(conf)
    return PowerControl(board, conf=tmp_path / "nvpmodel.conf")


def test_nvpmodel_query_samples() -> None:
    assert parse_nvpmodel_query(NVPMODEL_AGX_ORIN) == PowerMode(0, "MAXN")
    assert parse_nvpmodel_query(NVPMODEL_WARN) == PowerMode(0, "MAXN")
    assert parse_nvpmodel_query(NVPMODEL_ORIN_NANO_SUPER) == PowerMode(2, "MAXN_SUPER")
    assert parse_nvpmodel_query(NVPMODEL_THOR) == PowerMode(1, "120W")
    with pytest.raises(PowerError, match="cannot read the power mode"):
        parse_nvpmodel_query("NV Power Mode: MAXN\n")


def test_nvpmodel_conf_and_mode_names(tmp_path: Path) -> None:
    assert parse_nvpmodel_conf(NVPMODEL_CONF_AGX_ORIN) == {0: "MAXN", 1: "MODE_15W", 2: "MODE_30W", 3: "MODE_50W"}
    c = control(Board(), tmp_path, NVPMODEL_CONF_ORIN_NANO_SUPER)
    assert (c.resolve("maxn_super"), c.resolve("25W"), c.resolve("1"), c.resolve(0)) == (2, 1, 1, 0)
    with pytest.raises(PowerError, match="no power mode named 'MAXN'; modes here: 0 15W, 1 25W, 2 MAXN_SUPER"):
        c.resolve("MAXN")
    assert PowerControl(Board(), conf=tmp_path / "absent.conf").modes() == {}


def test_performance_mode_sets_and_restores(tmp_path: Path) -> None:
    board = Board(mode=1)
    with performance_mode("MAXN", control=control(board, tmp_path), clocks_file=tmp_path / "clocks") as previous:
        assert previous == PowerMode(1, "MODE_15W") and board.mode == 0
    store = str(tmp_path / "clocks")
    assert board.calls == [("nvpmodel", "-q"), ("jetson_clocks", "--store", store), ("nvpmodel", "-m", "0"),
                           ("jetson_clocks",), ("nvpmodel", "-m", "1"), ("jetson_clocks", "--restore", store)]
    assert board.stdin[2] == "NO\n"  # a reboot prompt is declined, never accepted
    assert board.mode == 1


def test_performance_mode_restores_after_an_exception(tmp_path: Path) -> None:
    board = Board(mode=2)
    with pytest.raises(KeyError, match="planner blew up"), \
            performance_mode(0, control=control(board, tmp_path), clocks_file="/tmp/c"):
        raise KeyError("planner blew up")
    assert board.calls[-2:] == [("nvpmodel", "-m", "2"), ("jetson_clocks", "--restore", "/tmp/c")]
    assert board.mode == 2


def test_performance_mode_without_a_mode_change_only_touches_clocks(tmp_path: Path) -> None:
    board = Board(mode=0)
    with performance_mode(0, control=control(board, tmp_path), clocks_file="/tmp/c"):
        pass
    assert board.calls == [("nvpmodel", "-q"), ("jetson_clocks", "--store", "/tmp/c"), ("jetson_clocks",),
                           ("jetson_clocks", "--restore", "/tmp/c")]
    board.calls.clear()
    with performance_mode(None, max_clocks=False, control=control(board, tmp_path), clocks_file="/tmp/c"):
        pass
    assert board.calls == [("nvpmodel", "-q"), ("jetson_clocks", "--store", "/tmp/c"),
                           ("jetson_clocks", "--restore", "/tmp/c")]


def test_a_failed_switch_is_still_undone(tmp_path: Path) -> None:
    def fail(call: tuple[str, ...]) -> CommandResult | None:
        return CommandResult(call, 1, "", "NVPM ERROR: failed to set power mode") if call == ("nvpmodel", "-m", "3") \
            else None

    board = Board(mode=1, fail=fail)
    with pytest.raises(PowerError, match=r"`nvpmodel -m 3` exited with status 1: NVPM ERROR"), \
            performance_mode("MODE_50W", control=control(board, tmp_path), clocks_file="/tmp/c"):
        pass  # pragma: no cover - never entered
    assert board.calls[-2:] == [("nvpmodel", "-m", "1"), ("jetson_clocks", "--restore", "/tmp/c")]


def test_restore_failures_are_reported(tmp_path: Path) -> None:
    def fail(call: tuple[str, ...]) -> CommandResult | None:
        return CommandResult(call, 1, "", "permission denied") if call[:2] == ("jetson_clocks", "--restore") else None

    board = Board(mode=1, fail=fail)
    with pytest.raises(PowerError, match=r"restoring the power state failed: .*--restore"), \
            performance_mode(0, control=control(board, tmp_path), clocks_file="/tmp/c"):
        pass
    assert board.mode == 1  # the mode came back although the clocks did not
    with pytest.raises(RuntimeError, match="boom") as info, \
            performance_mode(0, control=control(Board(mode=1, fail=fail), tmp_path), clocks_file="/tmp/c"):
        raise RuntimeError("boom")
    if sys.version_info >= (3, 11):  # exception notes
        assert any("restoring the power state failed too" in n for n in info.value.__notes__)


def test_reboot_prompt_and_missing_tools(tmp_path: Path) -> None:
    board = Board(fail=lambda call: CommandResult(call, 0, NVPMODEL_REBOOT) if call[1] == "-m" else None)
    with pytest.raises(RebootRequiredError, match="only after a reboot"):
        control(board, tmp_path).set_mode(0)

    def missing(args: Sequence[str], stdin: str | None) -> CommandResult:
        raise ToolMissingError(args[0])

    with pytest.raises(ToolMissingError, match=r"nvpmodel not found on PATH.*nvpmodel and jetson_clocks"):
        PowerControl(missing).query()
    with pytest.raises(ToolMissingError, match="nvpmodel-that-does-not-exist not found"):
        run_command(["nvpmodel-that-does-not-exist", "-q"])


def test_saved_state_round_trip(tmp_path: Path) -> None:
    board = Board(mode=3)
    c = control(board, tmp_path)
    state_file = tmp_path / "state" / "power-state.json"
    assert save_state(c, state_file) == {"mode": 3, "name": "MODE_50W", "clocks": str(tmp_path / "state" /
                                                                                        "power-state.clocks")}
    c.set_mode(0)
    assert restore_state(c, state_file) == PowerMode(3, "MODE_50W")
    assert board.calls[-2:] == [("nvpmodel", "-m", "3"), ("jetson_clocks", "--restore", str(state_file.with_suffix(
        ".clocks")))]
    assert not state_file.exists()  # restored once; a second --restore finds nothing stale
    with pytest.raises(PowerStateError, match="no saved power state"):
        restore_state(c, state_file)
    with pytest.raises(PowerStateError, match="no saved power state"):
        read_state(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"mode": "x"}))
    with pytest.raises(PowerStateError, match="unreadable power state"):
        read_state(tmp_path / "bad.json")


def test_power_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    board = Board(mode=1)
    monkeypatch.setattr(jetson_cli, "power_control", lambda: control(board, tmp_path))
    state = str(tmp_path / "s.json")
    assert main(["jetson", "power"]) == 0
    assert "power mode 1 (MODE_15W)" in capsys.readouterr().out
    assert main(["jetson", "power", "--mode", "MAXN", "--max-clocks", "--state", state]) == 0
    assert "power mode 0 set (was 1 MODE_15W" in capsys.readouterr().out
    assert board.calls[-3:] == [("jetson_clocks", "--store", str(tmp_path / "s.clocks")), ("nvpmodel", "-m", "0"),
                                ("jetson_clocks",)]
    assert main(["jetson", "power", "--restore", "--state", state]) == 0
    assert board.mode == 1
    assert main(["jetson", "power", "--restore", "--state", str(tmp_path / "none.json")]) == 2
    assert "no saved power state" in capsys.readouterr().err
    assert main(["jetson", "power", "--max-clocks"]) == 2


def test_power_cli_off_jetson(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(args: Sequence[str], stdin: str | None) -> CommandResult:
        raise ToolMissingError(args[0])

    monkeypatch.setattr(jetson_cli, "power_control", lambda: PowerControl(missing))
    assert main(["jetson", "power"]) == 2
    assert "blockpilot jetson: error: nvpmodel not found on PATH" in capsys.readouterr().err
