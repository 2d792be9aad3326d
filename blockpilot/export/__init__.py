"""ONNX export, TensorRT engine builds and bundles.

Importing the package stays torch-free (the ONNX Runtime backend reads :mod:`blockpilot.formats.onnx_spec`);
``export_onnx`` loads the torch exporter on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .onnx_graphs import export_onnx

        return export_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
