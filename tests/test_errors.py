"""One root for blockpilot's errors (issue 21 item 4): every exception class the package defines derives from
:class:`blockpilot.errors.BlockpilotError`, which is what the ``blockpilot`` command catches, once."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

from blockpilot.errors import BlockpilotError

ROOT = Path(__file__).resolve().parents[1] / "blockpilot"
BUILTIN_EXCEPTIONS = {name for name, value in vars(builtins).items()
                      if isinstance(value, type) and issubclass(value, BaseException)}


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def _classes() -> list[tuple[str, str, list[str]]]:
    """(module path, class name, base names) of every class in the package, read statically (no optional imports)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                found.append((str(path.relative_to(ROOT.parent)), node.name, [_base_name(b) for b in node.bases]))
    return found


def test_every_exception_class_derives_from_the_root() -> None:
    classes = _classes()
    # Exception classes: a built-in exception among the bases, or (to a fixed point) another of ours.
    ours = {"BlockpilotError"}
    changed = True
    while changed:
        changed = False
        for _, name, bases in classes:
            if name not in ours and any(b in BUILTIN_EXCEPTIONS or b in ours for b in bases):
                ours.add(name)
                changed = True
    rooted = {"BlockpilotError"}
    changed = True
    while changed:
        changed = False
        for _, name, bases in classes:
            if name not in rooted and any(b in rooted for b in bases):
                rooted.add(name)
                changed = True
    # A class is rooted only if every class of that name is (two modules may share a name).
    unrooted = [f"{path}: {name}({', '.join(bases)})" for path, name, bases in classes
                if name in ours and name != "BlockpilotError" and not any(b in rooted for b in bases)]
    assert len(ours) > 60
    assert not unrooted, "derive from blockpilot.errors.BlockpilotError:\n" + "\n".join(unrooted)


def test_the_root_keeps_the_builtin_bases_and_exit_codes() -> None:
    from blockpilot.cli_common import UserError
    from blockpilot.eval.compare import CompareError
    from blockpilot.formats.bundle import BundleError
    from blockpilot.jetson.commands import ToolMissingError
    from blockpilot.runtime.backend import BackendError
    from blockpilot.trt.compat import TrtUnavailableError

    assert issubclass(BundleError, ValueError) and issubclass(BundleError, BlockpilotError)
    assert issubclass(BackendError, RuntimeError) and issubclass(ToolMissingError, FileNotFoundError)
    assert issubclass(TrtUnavailableError, ImportError) and issubclass(UserError, ValueError)
    assert (UserError.exit_code, BundleError.exit_code, CompareError.exit_code) == (2, 2, 1)
    with pytest.raises(ValueError, match="x"):  # `except ValueError` written before the root still works
        raise BundleError("x")


def test_a_multi_line_error_is_reported_on_one_line() -> None:
    from blockpilot.cli import one_line

    assert one_line(ValueError("recipe needs fp8, which orin cannot run:\n  fp8: lm.*\norin runs int8.")) == (
        "recipe needs fp8, which orin cannot run: fp8: lm.*; orin runs int8.")
    assert one_line(BlockpilotError()) == "BlockpilotError"
