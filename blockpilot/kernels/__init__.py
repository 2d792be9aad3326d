"""Attention kernels for block-diffusion decoding.

``reference``
    Plain torch: :func:`~blockpilot.kernels.reference.block_diffusion_attention_ref` (the math every kernel is
    checked against) and :func:`~blockpilot.kernels.reference.write_window`.
``block_attention``
    The Triton kernel :func:`~blockpilot.kernels.block_attention.block_diffusion_attention` (and the in-place
    cache write :func:`~blockpilot.kernels.block_attention.write_window_`), shared by the TensorRT plugin and
    the GPU fast path. Importing it needs ``triton``; on a machine without a GPU set ``TRITON_INTERPRET=1``
    before the import to run it in Triton's interpreter.

Mode ids are those of :data:`blockpilot.formats.onnx_io.MODE_IDS`: 0 causal (key slot <= query slot), 1 block
(``key // block_size <= query // block_size``), 2 bidirectional. Importing this package loads neither.
"""

from __future__ import annotations

MODE_CAUSAL, MODE_BLOCK, MODE_BIDIRECTIONAL = 0, 1, 2

__all__ = ["MODE_BIDIRECTIONAL", "MODE_BLOCK", "MODE_CAUSAL"]
