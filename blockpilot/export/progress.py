"""Progress bars per stage of a long CLI job (``blockpilot export``), on stderr, without dependencies.

On a terminal each stage draws one bar that redraws in place (``\\r``); elsewhere (CI logs, pipes) each stage
prints one line when it ends, so logs stay readable. Stage timings are kept for the closing summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

BAR_WIDTH = 24


@dataclass
class Stage:
    name: str
    total: int
    done: int = 0
    detail: str = ""
    started: float = field(default_factory=time.perf_counter)


class StageProgress:
    """``with progress.stage("engines", total=4) as stage: ...; progress.advance(stage, "lm_step rtx")``.

    ``enabled=None`` draws bars only when ``stream`` is a terminal; ``False`` silences everything.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, stages: int = 0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if enabled is None else enabled
        self.quiet = enabled is False
        self.stages = stages
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int = 1) -> Iterator[Stage]:
        stage = Stage(name, max(total, 1))
        self._draw(stage)
        try:
            yield stage
        finally:
            elapsed = time.perf_counter() - stage.started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            stage.done = stage.total if stage.done < stage.total else stage.done
            self._draw(stage, final=True, elapsed=elapsed)

    def advance(self, stage: Stage, detail: str = "", step: int = 1) -> None:
        stage.done = min(stage.total, stage.done + step)
        stage.detail = detail
        self._draw(stage)

    def _draw(self, stage: Stage, *, final: bool = False, elapsed: float | None = None) -> None:
        if self.quiet or not (self.live or final):
            return
        index = len(self.seconds) if final else len(self.seconds) + 1
        prefix = f"[{index}/{self.stages}] " if self.stages else ""
        filled = round(BAR_WIDTH * stage.done / stage.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        tail = f"{elapsed:6.1f} s" if elapsed is not None else stage.detail
        line = f"{prefix}{stage.name:<9} [{bar}] {stage.done}/{stage.total} {tail}"
        if self.live:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
