"""The root of every error blockpilot raises on purpose.

Each typed error of the package derives from :class:`BlockpilotError` (most also from the built-in they
refine, such as ``ValueError`` or ``FileNotFoundError``, so ``except ValueError`` keeps working). The
``blockpilot`` command catches this one class: the message is printed as one line naming the file, flag or
field, and the process exits with :attr:`BlockpilotError.exit_code`. Anything else that escapes a command is
the program's fault and keeps its traceback. This module is a leaf: it imports nothing from blockpilot.
"""

from __future__ import annotations


class BlockpilotError(Exception):
    """An error blockpilot raises on purpose, with a message that says what to fix."""

    exit_code: int = 2  # the exit status of ``blockpilot`` when this error ends a command


class MissingExtraError(BlockpilotError, ImportError):
    """What was asked needs an optional dependency that is not installed; the message names the pip extra."""


def require_extra(module: str, extra: str, needed_for: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported: "``needed_for`` needs ``module``, which
    is not installed here: pip install 'blockpilot[``extra``]'". Looks the module up without importing it."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a half-installed one
        found = False
    if not found:
        raise MissingExtraError(f"{needed_for} needs {module}, which is not installed here: "
                                f"pip install 'blockpilot[{extra}]'", name=module)
