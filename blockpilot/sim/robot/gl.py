"""Offscreen OpenGL for MuJoCo on a headless machine: ``MUJOCO_GL`` must be set before ``mujoco`` is imported."""

from __future__ import annotations

import ctypes.util
import importlib
import os
import sys

from blockpilot.errors import BlockpilotError

# MuJoCo's offscreen backends, in the order tried: EGL (Mesa's llvmpipe on a CPU machine, the GPU's driver on a
# workstation), then OSMesa. "glfw" needs a display and is never picked here.
_BACKENDS = (("egl", "EGL"), ("osmesa", "OSMesa"))


class OffscreenGLError(BlockpilotError, RuntimeError):
    """No offscreen OpenGL backend MuJoCo can render with."""


def choose_gl_backend() -> str:
    """Set ``MUJOCO_GL`` (and PyOpenGL's ``PYOPENGL_PLATFORM``) to the first offscreen backend whose library is
    present, unless the caller already set it; returns the backend. Call before anything imports ``mujoco``: MuJoCo
    reads the variable once, at import."""
    chosen = os.environ.get("MUJOCO_GL")
    if not chosen:
        found = [name for name, lib in _BACKENDS if ctypes.util.find_library(lib)]
        if not found:
            raise OffscreenGLError("no offscreen OpenGL library for MuJoCo: install libegl1 (EGL) or libosmesa6 "
                                   "(OSMesa), or set MUJOCO_GL")
        chosen = found[0]
        os.environ["MUJOCO_GL"] = chosen
    if chosen in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", chosen)
    _triton_llvm_first()
    return chosen


def _triton_llvm_first() -> None:
    """``torch._dynamo`` (imported by AdamW, ``torch.compile``) loads Triton and its own LLVM; imported after Mesa's
    llvmpipe (another LLVM, loaded with the first offscreen context) the process segfaults (torch 2.13, Mesa here).
    Where the process already uses torch, load it now, before MuJoCo renders anything."""
    if "torch" in sys.modules:
        importlib.import_module("torch._dynamo")
