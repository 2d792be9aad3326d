"""Batch-one runtime: backends, KV-cache bookkeeping, decoders and the Planner."""
