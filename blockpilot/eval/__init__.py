"""Offline replay evaluation: sources, metrics, reports."""
