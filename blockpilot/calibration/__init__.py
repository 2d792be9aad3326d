"""Calibration sets drawn from replay sources."""
