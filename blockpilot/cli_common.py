"""What every ``blockpilot`` command module shares: the one-line user error."""

from __future__ import annotations


class UserError(Exception):
    """An error the CLI reports as one line (bad path, bad checkpoint, bad config) and exit code 2."""
