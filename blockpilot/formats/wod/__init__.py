"""Minimal WOD-E2E protos (official names and field numbers) and their generated modules.

Regenerate with ``python -m blockpilot.formats.wod.compile`` after editing a ``.proto`` file.
"""
