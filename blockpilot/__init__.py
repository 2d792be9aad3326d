"""blockpilot: block-diffusion VLA models on robots and cars."""

__version__ = "0.1.0"
