"""The top-1 token and its probability from logits, in float32 or in the model's own dtype.

The published Fast-dLLM v2 ``generate`` takes the softmax of the LM head's output as it comes, so a
bf16 model gets bf16 probabilities: between 0.5 and 1 they step by 2**-8, so every confidence
above 0.998 rounds to 1.0. Two positions whose float32 confidences are 0.9985 and 0.9995 then tie,
and the "most confident position" (an argmax) is the first of them; the same rounding can tie two
candidate tokens, and the first id wins. ``"float32"`` (the default) upcasts before the softmax and
picks the truly most confident; ``"model"`` reproduces the published arithmetic where exact parity
with it matters. Both leave the mask id out (it is never a prediction); the published code keeps
it in the softmax, which differs only where the model gives the mask token visible probability.
"""

from __future__ import annotations

import torch

SOFTMAX_DTYPES = ("float32", "model")


def check_softmax_dtype(value: str) -> None:
    if value not in SOFTMAX_DTYPES:
        raise ValueError(f"softmax_dtype must be one of {SOFTMAX_DTYPES}, got {value!r}")


def top1_probability(logits: torch.Tensor, model_dtype: torch.dtype,
                     softmax_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """``(prob, top1)`` over the last axis: float32 probabilities and int64 ids.

    ``logits`` come from a model computing in ``model_dtype`` (upcast or not); with
    ``softmax_dtype="model"`` the softmax and the argmax run in that dtype, ties going to the lowest
    index, and the probability is that dtype's value widened to float32.
    """
    if softmax_dtype == "model":
        prob, top1 = logits.to(model_dtype).softmax(-1).max(-1)
        return prob.float(), top1
    check_softmax_dtype(softmax_dtype)
    prob, top1 = logits.float().softmax(-1).max(-1)
    return prob, top1
