"""Power modes (``nvpmodel``) and clock pinning (``jetson_clocks``), always with a way back.

``nvpmodel -q`` prints optional ``NVPM WARN`` lines, then ``NV Power Mode: <name>`` and the mode id on its own
line. ``nvpmodel -m N`` may need a reboot for some transitions and then asks on stdin; we answer no and raise
:class:`RebootRequiredError` instead of rebooting a car. Mode names come from ``/etc/nvpmodel.conf``
(``< POWER_MODEL ID=0 NAME=MAXN >``); ids differ per module (AGX Orin: 0 MAXN; Orin Nano Super: 2 MAXN_SUPER;
AGX Thor: 0 MAXN, 1 the 120W default), so a mode may be given by name. Both tools need root.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..atomic_io import atomic_write
from ..errors import BlockpilotError
from .commands import CommandError, Runner, ToolMissingError, run_command

NVPMODEL_CONF = Path("/etc/nvpmodel.conf")
STATE_FILE = Path("/var/lib/blockpilot/power-state.json")


class PowerError(BlockpilotError, RuntimeError):
    """A power-mode operation that failed; the message says which and why."""


class RebootRequiredError(PowerError):
    """``nvpmodel`` would only switch to this mode after a reboot (declined here)."""


class PowerStateError(PowerError):
    """The saved power state (for ``--restore``) is missing or unreadable."""


@dataclass(frozen=True)
class PowerMode:
    id: int
    name: str


def parse_nvpmodel_query(text: str) -> PowerMode:
    """``NV Power Mode: MAXN`` followed by ``0`` (``NVPM WARN`` lines ignored) -> ``PowerMode(0, "MAXN")``."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("NVPM")]
    for i, line in enumerate(lines):
        match = re.match(r"NV Power Mode:\s*(.+)$", line)
        if match and i + 1 < len(lines) and lines[i + 1].isdigit():
            return PowerMode(int(lines[i + 1]), match.group(1).strip())
    raise PowerError(f"cannot read the power mode from `nvpmodel -q` output: {text.strip()[:200]!r}")


def parse_nvpmodel_conf(text: str) -> dict[int, str]:
    """Mode ids and names defined in ``/etc/nvpmodel.conf``."""
    return {int(i): name for i, name in re.findall(r"^<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)\s*>", text, re.M)}


def _reboot_prompt(output: str) -> bool:
    return "Reboot required" in output or "DO YOU WANT TO REBOOT" in output


class PowerControl:
    """``nvpmodel`` and ``jetson_clocks`` through an injectable :data:`~blockpilot.jetson.commands.Runner`."""

    def __init__(self, runner: Runner = run_command, *, nvpmodel: str = "nvpmodel",
                 jetson_clocks: str = "jetson_clocks", conf: Path = NVPMODEL_CONF) -> None:
        self.runner, self.nvpmodel, self.jetson_clocks, self.conf = runner, nvpmodel, jetson_clocks, conf

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        try:
            result = self.runner(args, stdin)
        except ToolMissingError as exc:
            raise ToolMissingError(exc.tool, "power modes need JetPack's nvpmodel and jetson_clocks") from None
        out = result.stdout + result.stderr
        if _reboot_prompt(out):
            raise RebootRequiredError(f"`{' '.join(args)}`: this power mode takes effect only after a reboot "
                                      "(declined); reboot once with it set, or pick a mode that switches live")
        try:
            result.check()
        except CommandError as exc:
            raise PowerError(f"{exc} (power modes and clocks need root)") from None
        return out

    def query(self) -> PowerMode:
        return parse_nvpmodel_query(self._run([self.nvpmodel, "-q"]))

    def modes(self) -> dict[int, str]:
        """The modes ``/etc/nvpmodel.conf`` defines (``{}`` when it cannot be read)."""
        try:
            return parse_nvpmodel_conf(self.conf.read_text(errors="replace"))
        except OSError:
            return {}

    def resolve(self, mode: int | str) -> int:
        """A mode id from an id or a name (case-insensitive) of :meth:`modes`."""
        if isinstance(mode, int) or str(mode).strip().isdigit():
            return int(mode)
        modes = self.modes()
        found = [i for i, name in modes.items() if name.lower() == str(mode).strip().lower()]
        if not found:
            known = ", ".join(f"{i} {n}" for i, n in sorted(modes.items())) or f"none ({self.conf} unreadable)"
            raise PowerError(f"no power mode named {mode!r}; modes here: {known}")
        return found[0]

    def set_mode(self, mode: int | str) -> None:
        self._run([self.nvpmodel, "-m", str(self.resolve(mode))], stdin="NO\n")

    def max_clocks(self) -> None:
        self._run([self.jetson_clocks])

    def store_clocks(self, path: str | Path) -> None:
        self._run([self.jetson_clocks, "--store", str(path)])

    def restore_clocks(self, path: str | Path) -> None:
        self._run([self.jetson_clocks, "--restore", str(path)])


@contextmanager
def performance_mode(mode: int | str | None = None, *, max_clocks: bool = True, control: PowerControl | None = None,
                     clocks_file: str | Path | None = None) -> Iterator[PowerMode]:
    """Within the block: power mode ``mode`` (``None``: keep the current one) and, with ``max_clocks``, clocks pinned
    by ``jetson_clocks``. Yields the mode that was active before; on the way out, even after an exception, sets
    that mode back and restores the clocks stored on the way in (``jetson_clocks --store`` / ``--restore``).
    A restore failure is raised unless an exception is already leaving the block (then it is attached as a note)."""
    control = control or PowerControl()
    previous = control.query()
    with tempfile.TemporaryDirectory(prefix="blockpilot-clocks-") as tmp:
        store = Path(clocks_file) if clocks_file is not None else Path(tmp) / "clocks.conf"
        control.store_clocks(store)
        changed = False
        try:
            if mode is not None and control.resolve(mode) != previous.id:
                changed = True  # set before the call: a half-applied switch is undone too
                control.set_mode(mode)
            if max_clocks:
                control.max_clocks()
            yield previous
        except BaseException as exc:
            for error in _restore(control, previous, store, changed):
                if hasattr(exc, "add_note"):
                    exc.add_note(f"restoring the power state failed too: {error}")
            raise
        else:
            errors = _restore(control, previous, store, changed)
            if errors:
                raise PowerError("restoring the power state failed: " + "; ".join(map(str, errors)))


def _restore(control: PowerControl, previous: PowerMode, store: Path, changed: bool) -> list[Exception]:
    """Mode first (a mode switch resets the clocks), then the stored clocks; every step tried, failures returned."""
    errors: list[Exception] = []
    steps = ([lambda: control.set_mode(previous.id)] if changed else []) + [lambda: control.restore_clocks(store)]
    for step in steps:
        try:
            step()
        except Exception as exc:  # every step runs; the caller reports all of them
            errors.append(exc)
    return errors


def save_state(control: PowerControl, state_file: str | Path = STATE_FILE) -> dict[str, object]:
    """Record the current mode and clocks next to ``state_file`` (for a later :func:`restore_state`)."""
    state_file = Path(state_file)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    clocks = state_file.with_suffix(".clocks")
    current = control.query()
    control.store_clocks(clocks)
    state: dict[str, object] = {"mode": current.id, "name": current.name, "clocks": str(clocks)}
    atomic_write(state_file, json.dumps(state, indent=2) + "\n")
    return state


def read_state(state_file: str | Path = STATE_FILE) -> Mapping[str, object]:
    try:
        state = json.loads(Path(state_file).read_text())
        int(state["mode"])
        str(state["clocks"])
    except FileNotFoundError:
        raise PowerStateError(f"{state_file}: no saved power state (set a mode with --mode first)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PowerStateError(f"{state_file}: unreadable power state ({exc})") from None
    return state


def restore_state(control: PowerControl, state_file: str | Path = STATE_FILE) -> PowerMode:
    """Put back the mode and clocks :func:`save_state` recorded and remove the saved state (a stale one is never
    restored twice); returns the mode restored."""
    state = read_state(state_file)
    mode = PowerMode(int(str(state["mode"])), str(state.get("name", "")))
    clocks = Path(str(state["clocks"]))
    errors = _restore(control, mode, clocks, changed=True)
    if errors:
        raise PowerError("restoring the power state failed: " + "; ".join(map(str, errors)))
    Path(state_file).unlink(missing_ok=True)
    clocks.unlink(missing_ok=True)
    return mode
