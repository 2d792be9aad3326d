"""TensorRT pieces shared by the engine build (:mod:`blockpilot.export`) and the runtime (:mod:`blockpilot.runtime`).

:mod:`.compat` imports TensorRT proper or TensorRT-RTX behind one small wrapper; :mod:`.plugin` is the
IPluginV3 Python plugin behind the ``BlockDiffusionAttention`` node of the plugin graph, registered before a
plugin graph is parsed and before a plugin engine is deserialized. Nothing here imports ``export`` or
``runtime``; torch and Triton are imported only when the plugin runs on a GPU.
"""

from .compat import TensorRT, TrtUnavailableError, load_tensorrt

__all__ = ["TensorRT", "TrtUnavailableError", "load_tensorrt"]
