"""What every ``blockpilot`` command module shares: the one-line user error, argument checks that name the
flag as typed, and the ``--json`` option. A leaf: it imports only the other leaves."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic_io import atomic_write
from .errors import BlockpilotError

JSON_HELP = "print machine-readable JSON on stdout instead of text"


class UserError(BlockpilotError, ValueError):
    """An error the CLI reports as one line (bad path, bad checkpoint, bad config) and exit code 2."""


@contextmanager
def about(flag: str) -> Iterator[None]:
    """Report a :class:`BlockpilotError` raised inside as a :class:`UserError` about ``flag`` (the flag as typed)."""
    try:
        yield
    except UserError:
        raise
    except BlockpilotError as exc:
        raise UserError(f"{flag}: {exc}") from exc


def _number(kind: Callable[[str], Any], text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def bounded(kind: Callable[[str], Any], low: float | None = None, high: float | None = None, *,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` with ``low_open``).
    argparse names the flag as typed in the error (``argument --samples: ...``) and exits 2."""
    def parse(text: str) -> Any:
        value = _number(kind, text)
        if value != value or (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and value > high):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"<= {high:g}"
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} {' and '.join(p for p in (lo, hi) if p)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse shows "invalid int value" for a failing type
    return parse


positive_int = bounded(int, 1)
non_negative_int = bounded(int, 0)
non_negative_float = bounded(float, 0.0)
positive_float = bounded(float, 0.0, low_open=True)
fraction = bounded(float, 0.0, 1.0)


def existing_dir(flag: str, path: str | Path, *, holding: str | None = None) -> Path:
    """``path`` given to ``flag`` as an existing directory (holding the file ``holding``), else a :class:`UserError`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: does not exist (expected a directory)")
    if not p.is_dir():
        raise UserError(f"{flag} {path}: not a directory")
    if holding is not None and not (p / holding).is_file():
        raise UserError(f"{flag} {path}: no {holding} in it")
    return p


def existing_path(flag: str, path: str | Path) -> Path:
    """A file or directory that must exist."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: does not exist")
    return p


def writable_target(flag: str, path: str | Path, *, overwrite: bool = True, directory: bool = False) -> Path:
    """An output path: refused up front when it exists and may not be replaced, is the wrong kind (a file where a
    directory goes, or the reverse), or its nearest existing parent is not a writable directory."""
    p = Path(path)
    if p.exists():
        if directory and not p.is_dir():
            raise UserError(f"{flag} {path}: exists and is a file, not a directory")
        if not directory and p.is_dir():
            raise UserError(f"{flag} {path}: is a directory; give a file path")
        if not overwrite:
            raise UserError(f"{flag} {path}: already exists; pass --overwrite to replace it")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return p


def add_json_option(parser: argparse.ArgumentParser, *, file_help: str | None = None) -> None:
    """``--json`` (the same on every command: JSON on stdout instead of text) and, with ``file_help``,
    ``--json-out PATH`` (also write the JSON to a file)."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    if file_help is not None:
        parser.add_argument("--json-out", default=None, metavar="PATH", help=file_help)


def emit(args: argparse.Namespace, data: Any, text: str | None) -> None:
    """Write ``data`` to ``--json-out`` when given, then print it as JSON (``--json``) or print ``text``."""
    rendered = json.dumps(data, indent=2, default=str) + "\n"
    if getattr(args, "json_out", None):
        atomic_write(args.json_out, rendered)
    if getattr(args, "json", False) or text is None:
        print(rendered, end="")
    else:
        print(text)


def _key_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such key file")
    return text


def add_trusted_key_option(parser: argparse.ArgumentParser) -> None:
    """``--trusted-key FILE`` (repeatable, into ``args.trusted_keys``): accept a bundle only when signed by one of
    these public keys (:mod:`blockpilot.formats.signing`)."""
    parser.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], type=_key_file,
                        metavar="FILE", help="public key (PEM, from blockpilot keygen) a bundle must be signed by; "
                                             "repeatable; unsigned, altered or otherwise signed bundles are refused")


def one_line(exc: BaseException) -> str:
    """The error's message on one line: a multi-line message's lines joined with '; ' (a space after a colon)."""
    text = ""
    for line in (part.strip() for part in str(exc).splitlines()):
        if line:
            text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text or type(exc).__name__


def quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass
