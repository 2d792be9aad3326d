"""How the Jetson helpers run the board's tools (``nvpmodel``, ``jetson_clocks``, ``dpkg-query``): through a
:data:`Runner`, a plain callable, so tests hand in a recording runner and assert the exact command lines."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BlockpilotError


class ToolMissingError(BlockpilotError, FileNotFoundError):
    """A board tool is not installed (or not on ``PATH``): this is not a Jetson, or JetPack is incomplete."""

    def __init__(self, tool: str, hint: str = "") -> None:
        self.tool = tool
        super().__init__(f"{tool} not found on PATH: this does not look like a Jetson running JetPack"
                         + (f" ({hint})" if hint else ""))


class CommandError(BlockpilotError, RuntimeError):
    """A board tool ran and failed; the message carries the command line, its exit status and its output."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = f": {' | '.join(output[-3:])}" if output else ""
        super().__init__(f"`{' '.join(result.args)}` exited with status {result.returncode}{tail}")


@dataclass(frozen=True)
class CommandResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    def check(self) -> CommandResult:
        """``self`` when the command succeeded, else :class:`CommandError`."""
        if self.returncode != 0:
            raise CommandError(self)
        return self


# args, text fed to stdin (``None``: no input) -> result; raises ToolMissingError when the program is absent.
Runner = Callable[[Sequence[str], str | None], CommandResult]


def run_command(args: Sequence[str], stdin: str | None = None, *, timeout: float = 60.0) -> CommandResult:
    """The default :data:`Runner`: ``subprocess.run`` without a shell, output captured as text."""
    try:
        done = subprocess.run(list(args), input=stdin if stdin is not None else "", capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise ToolMissingError(args[0]) from None
    return CommandResult(tuple(args), done.returncode, done.stdout, done.stderr)
