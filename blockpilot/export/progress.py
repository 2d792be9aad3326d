"""Progress per stage of a long CLI job (``blockpilot export``), on stderr.

On a terminal each stage draws one tqdm bar (:mod:`blockpilot.progress_bars`); elsewhere (CI logs, pipes)
each stage prints one line when it ends, so logs stay readable. Stage timings are kept for the closing summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from ..progress_bars import Bar, NoBar, is_terminal, live_bar

BAR_WIDTH = 24


@dataclass
class Stage:
    name: str
    total: int
    done: int = 0
    detail: str = ""
    started: float = field(default_factory=time.perf_counter)
    bar: Bar = field(default_factory=NoBar)


class StageProgress:
    """``with progress.stage("engines", total=4) as stage: ...; progress.advance(stage, "lm_step rtx")``.

    ``enabled=None`` draws bars only when ``stream`` is a terminal; ``False`` silences everything.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, stages: int = 0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = is_terminal(self.stream) if enabled is None else enabled
        self.quiet = enabled is False
        self.stages = stages
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int = 1) -> Iterator[Stage]:
        stage = Stage(name, max(total, 1))
        if self.live and not self.quiet:
            stage.bar = live_bar(stage.total, f"{self._prefix(len(self.seconds) + 1)}{name:<9}", stream=self.stream,
                                 enabled=True, unit="step")
        try:
            yield stage
        finally:
            elapsed = time.perf_counter() - stage.started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if stage.done < stage.total:  # a finished stage shows as complete
                stage.bar.update(stage.total - stage.done)
                stage.done = stage.total
            stage.bar.close()
            if not self.live and not self.quiet:
                self._line(stage, elapsed)

    def advance(self, stage: Stage, detail: str = "", step: int = 1) -> None:
        step = min(step, stage.total - stage.done)
        stage.done += step
        stage.detail = detail
        stage.bar.set_postfix_str(detail, refresh=False)
        stage.bar.update(step)

    def _prefix(self, index: int) -> str:
        return f"[{index}/{self.stages}] " if self.stages else ""

    def _line(self, stage: Stage, elapsed: float) -> None:
        """The one line a finished stage leaves in a log."""
        filled = round(BAR_WIDTH * stage.done / stage.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"{self._prefix(len(self.seconds))}{stage.name:<9} [{bar}] {stage.done}/{stage.total} "
                          f"{elapsed:6.1f} s\n")
        self.stream.flush()
