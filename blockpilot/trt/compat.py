"""One import of TensorRT for every caller: ``tensorrt`` proper (JetPack's 10.x, 11.x on x86) or ``tensorrt_rtx``
(TensorRT-RTX), wrapped with which flavor it is. The two share the name-based API of TensorRT 10 that the
build and the runtime use."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import BlockpilotError

MODULES = ("tensorrt", "tensorrt_rtx")


class TrtUnavailableError(BlockpilotError, ImportError):
    """None of the requested TensorRT modules can be imported here."""


@dataclass(frozen=True)
class TensorRT:
    """The imported TensorRT module plus which flavor it is; attribute access falls through to the module."""

    module: ModuleType
    flavor: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    @property
    def is_rtx(self) -> bool:
        return self.flavor == "tensorrt-rtx"


def load_tensorrt(prefer: Sequence[str] = MODULES) -> TensorRT:
    """The first importable TensorRT module of ``prefer`` (TensorRT proper first, as on a Jetson). Raises
    :class:`TrtUnavailableError` (an ``ImportError`` whose ``name`` is the module when only one was asked for)."""
    errors: list[str] = []
    for name in prefer:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # also catches a broken install that fails half-way
            errors.append(f"{name}: {exc}")
            continue
        flavor = "tensorrt-rtx" if name == "tensorrt_rtx" else "tensorrt"
        return TensorRT(module, flavor, str(getattr(module, "__version__", "unknown")))
    raise TrtUnavailableError("no TensorRT here: install tensorrt-rtx-cu13 (workstation, CPU-only builds) or use "
                              "JetPack's tensorrt (Jetson); tried " + "; ".join(errors),
                              name=prefer[0] if len(prefer) == 1 else None)


def trt_module(trt: TensorRT | Any | None = None) -> Any:
    """The bare TensorRT module of ``trt`` (a :class:`TensorRT`, a module, or ``None``: :func:`load_tensorrt`)."""
    if trt is None:
        trt = load_tensorrt()
    return trt.module if isinstance(trt, TensorRT) else trt
