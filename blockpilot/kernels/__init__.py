"""GPU kernels for block-diffusion decoding (Triton), each beside the torch math it is checked against.

``reference``
    Plain torch, the math every kernel is checked against:
    :func:`~blockpilot.kernels.reference.block_diffusion_attention_ref`,
    :func:`~blockpilot.kernels.reference.write_window`, and the FP8 rule (``quant_scale``, ``quantize_e4m3``,
    :func:`~blockpilot.kernels.reference.quantize_rows_ref`) that the CUDA backend's ``Fp8Linear`` uses.
``block_attention``
    The Triton kernel :func:`~blockpilot.kernels.block_attention.block_diffusion_attention` (and the in-place
    cache write :func:`~blockpilot.kernels.block_attention.write_window_`), shared by the TensorRT plugin and
    the GPU fast path. Grouped-query heads share their K/V tiles; a step too small to fill the GPU splits its
    keys over several programs (split-KV, :func:`~blockpilot.kernels.block_attention.default_num_splits`) whose
    partial states are merged. :func:`~blockpilot.kernels.block_attention.attention_with_lse` also returns the
    log-sum-exp. Importing it needs ``triton``; on a machine without a GPU set ``TRITON_INTERPRET=1`` before the
    import to run it in Triton's interpreter.
``merge``
    Attention states ``(out, lse)`` over disjoint key sets merged into the state over their union (the split-KV
    merge, and :func:`~blockpilot.kernels.merge.merge_attention_states` with its torch reference); needs ``triton``.
``fused``
    The decode layer's small ops in one launch each: residual add + RMSNorm, RoPE + KV-cache write (+ a draft's
    save and restore), SwiGLU; needs ``triton``.
``top1``
    The LM-head epilogue: top-1 id and its probability from the logits, no float32 copy; needs ``triton``.
``fp8_quant``
    Dynamic or static per-tensor FP8 (e4m3) quantization of a GEMM's activations in two launches, padded for
    ``torch._scaled_mm``; needs ``triton``.

The ``mode`` the kernels take is :attr:`blockpilot.vla.modes.AttentionMode.id`: 0 causal (key slot <= query slot),
1 block (``key // block_size <= query // block_size``), 2 bidirectional. Importing this package loads none of them.
"""
