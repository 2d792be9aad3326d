"""Progress bars: tqdm on a terminal only, nothing under --quiet, plain lines (or nothing) in logs."""

from __future__ import annotations

import io
import subprocess
import sys

from blockpilot.eval.evaluator import SampleProgress
from blockpilot.progress_bars import NoBar, is_terminal, live_bar, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_only() -> None:
    log = io.StringIO()
    assert not is_terminal(log) and is_terminal(Terminal())
    assert isinstance(live_bar(3, "replay", stream=log), NoBar)
    assert isinstance(live_bar(3, "replay", stream=Terminal(), enabled=False), NoBar)  # --quiet / --json
    term = Terminal()
    bar = live_bar(3, "calibration", stream=term, unit="plan")
    for i in range(3):
        bar.set_postfix_str(f"s{i}", refresh=False)
        bar.update()
    bar.close()
    final = term.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert final.startswith("calibration: 100%") and "3/3" in final and "plan" in final and "s2" in final
    assert log.getvalue() == ""


def test_track_yields_every_item_and_closes_on_break() -> None:
    assert list(track(iter(range(5)), 5, "x", enabled=False)) == [0, 1, 2, 3, 4]
    seen = []
    for item in track(range(10), 10, "x", enabled=False):
        seen.append(item)
        if item == 2:
            break
    assert seen == [0, 1, 2]


def test_replay_progress_is_a_bar_on_a_terminal_and_deciles_in_a_log() -> None:
    term, log = Terminal(), io.StringIO()
    for stream in (term, log):
        progress = SampleProgress(20, stream=stream)
        for done in range(1, 21):
            progress.update(done, {"ok": done, "failed": 0})
        progress.close()
    final = term.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert final.startswith("replay: 100%") and "20/20" in final and "ok 20" in final
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in log.getvalue()  # one line per 10 % (0 % .. 100 %), never a redraw
    assert lines[-1].startswith("[########################] 20/20 ok 20")
    quiet = Terminal()
    SampleProgress(5, stream=quiet, enabled=False).update(5, {"ok": 5})
    assert quiet.getvalue() == ""


def test_progress_bars_import_no_tqdm_until_a_bar_draws() -> None:
    code = ("import sys, blockpilot.progress_bars as p; p.live_bar(3, 'x'); "
            "print('tqdm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # stderr is a pipe here: no bar, no import
