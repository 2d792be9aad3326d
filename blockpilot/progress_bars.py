"""Live progress bars (tqdm) on stderr for long loops: export stages, eval replay, calibration, the quantization gate.

A bar draws only where someone watches: on a terminal, and not under ``--quiet`` or ``--json``. Off a
terminal (CI logs, pipes) :func:`live_bar` hands back a bar that draws nothing, so no redraw ever lands
in a log and stdout is never touched. tqdm comes with the ``export``, ``quant`` and ``eval`` extras; where
it is not installed (the car's runtime install) the bars are simply off. A leaf: imports nothing from
blockpilot.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TextIO, TypeVar

T = TypeVar("T")


class Bar(Protocol):
    """The part of tqdm's interface the callers use."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...


class NoBar:
    """A bar that draws nothing (off a terminal, under ``--quiet``/``--json``, or without tqdm)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def live_bar(total: int | None, desc: str, *, stream: TextIO | None = None, enabled: bool | None = None,
             unit: str = "it") -> Bar:
    """A tqdm bar on ``stream`` (default stderr). ``enabled=None`` draws only on a terminal, ``False``
    never (``--quiet``, ``--json``), ``True`` always (tests drawing into a buffer)."""
    stream = sys.stderr if stream is None else stream
    if enabled is False or (enabled is None and not is_terminal(stream)):
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the car's runtime install has no tqdm: bars are a workstation nicety
        return NoBar()
    return tqdm(total=total, desc=desc, file=stream, unit=unit, leave=True, dynamic_ncols=True,
                mininterval=0.2)


def track(items: Iterable[T], total: int, desc: str, *, enabled: bool | None = None, unit: str = "it"
          ) -> Iterator[T]:
    """``items`` as they are, advancing a :func:`live_bar` over them; the bar closes when the loop ends
    or breaks."""
    bar = live_bar(total, desc, enabled=enabled, unit=unit)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
