"""Minimal WOD-E2E protos (official names and field numbers) and their generated modules.

Regenerate with ``python -m blockpilot.sim.protos.compile`` after editing a ``.proto`` file.
"""
