"""FP8 (e4m3) linears of the CUDA backend: weights and scales from a modelopt-quantized model, matmuls through
``torch._scaled_mm``.

The scales follow modelopt's FP8 fake quantization exactly (``tensor_quant._fp8_eager``, in torch in
:mod:`blockpilot.kernels.reference`): with ``amax`` from the
quantizer, ``quant = 448 / amax`` (``amax <= 2**-24`` counts as 1), ``q = e4m3(clamp(x * quant, ±448))`` and the
dequantized value is ``q * (1 / quant)``. A weight quantizer gives a per-tensor ``amax`` (``()``, modelopt's FP8
default) or a per-output-channel one (``(out, 1)``, ``axis=0``); an input quantizer's calibrated ``amax`` gives a
static activation scale, else the activation scale is dynamic (the ``amax`` of each call's input, on the device).
A model without quantizers takes its weight scales from the weights themselves (per channel by default).

``Fp8Linear`` multiplies with ``torch._scaled_mm`` (per-tensor scales, or row-wise scales with a bf16 output
when the weight is per channel), or, with ``matmul="dequantize"`` (the default off CUDA), computes the same
product on dequantized float32 operands: the arithmetic modelopt's fake-quantized model runs, used to check
the scales on a CPU. On CUDA the activation is quantized by two Triton kernels
(:func:`blockpilot.kernels.fp8_quant.quantize_rows`; a dozen launch-bound torch ops otherwise, the fallback
without triton), with the same bits. :meth:`Fp8Linear.concat` fuses linears that share an input (q/k/v,
gate/up) into one per-channel GEMM. Modelopt is never imported here: the quantizers are read by attribute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import quant_scale, quantize_e4m3, quantize_rows_ref
from .plan_types import PlannerSetupError

MATMULS = ("auto", "scaled_mm", "dequantize")
ACTIVATION_SCALES = ("dynamic", "static")


@dataclass(frozen=True)
class Fp8Scales:
    """What a modelopt FP8 linear carries: the weight ``amax`` (``()`` or ``(out, 1)``) and the input ``amax``
    (``()``; ``None`` when the input quantizer is off)."""

    weight_amax: torch.Tensor
    input_amax: torch.Tensor | None

    @property
    def per_channel(self) -> bool:
        return self.weight_amax.numel() > 1


def _is_e4m3(quantizer: nn.Module) -> bool:
    bits = getattr(quantizer, "num_bits", None)
    return isinstance(bits, (tuple, list)) and tuple(int(b) for b in bits) == (4, 3) \
        and not getattr(quantizer, "block_sizes", None)


def _enabled(quantizer: nn.Module | None) -> bool:
    return quantizer is not None and bool(getattr(quantizer, "is_enabled", False))


def modelopt_scales(name: str, linear: nn.Module) -> Fp8Scales | None:
    """The FP8 scales of a modelopt-quantized linear, ``None`` when it has no enabled weight quantizer; raises
    :class:`PlannerSetupError` for a format the backend cannot run (NVFP4, INT8, an FP8 KV-cache output
    quantizer) or an uncalibrated quantizer."""
    weight_q = getattr(linear, "weight_quantizer", None)
    if not _enabled(weight_q):
        return None
    assert weight_q is not None
    if not _is_e4m3(weight_q):
        raise PlannerSetupError(f"{name}: the CUDA backend runs FP8 (e4m3) weight quantizers only, this one is "
                                f"num_bits={getattr(weight_q, 'num_bits', None)} "
                                f"block_sizes={getattr(weight_q, 'block_sizes', None)}")
    if _enabled(getattr(linear, "output_quantizer", None)):
        raise PlannerSetupError(f"{name}: an output quantizer (FP8 KV cache) is not supported by the CUDA backend; "
                                "quantize without kv_cache")
    weight_amax = getattr(weight_q, "amax", None)
    if not isinstance(weight_amax, torch.Tensor):
        raise PlannerSetupError(f"{name}: the weight quantizer holds no amax (not calibrated)")
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    out_features = int(weight.shape[0])
    if weight_amax.numel() not in (1, out_features):
        raise PlannerSetupError(f"{name}: weight amax of shape {tuple(weight_amax.shape)} is neither per tensor "
                                f"nor per output channel ({out_features})")
    input_q = getattr(linear, "input_quantizer", None)
    input_amax = None
    if _enabled(input_q):
        assert input_q is not None
        input_amax = getattr(input_q, "amax", None)
        if not _is_e4m3(input_q) or not isinstance(input_amax, torch.Tensor) or input_amax.numel() != 1:
            raise PlannerSetupError(f"{name}: the input quantizer must be calibrated per-tensor FP8 (e4m3)")
    shape = (out_features, 1) if weight_amax.numel() > 1 else ()
    return Fp8Scales(weight_amax.detach().float().reshape(shape),
                     None if input_amax is None else input_amax.detach().float().reshape(()))


def weight_amax(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The max-abs of ``weight`` ``(out, in)``: ``(out, 1)`` per output channel, else ``()``."""
    w = weight.detach().abs().to(torch.float32)
    return w.amax(dim=1, keepdim=True) if per_channel else w.amax()


class Fp8Linear:
    """``y = x @ W.T + b`` with ``W`` in float8 e4m3 and ``x`` quantized per call; ``x`` and ``y`` in ``out_dtype``.

    ``weight`` ``(out, in)`` is stored row-major, which is the column-major ``(in, out)`` operand
    ``torch._scaled_mm`` wants. ``input_amax``: static activation scale (else dynamic).
    """

    def __init__(self, weight: torch.Tensor, amax: torch.Tensor, bias: torch.Tensor | None, *,
                 input_amax: torch.Tensor | None, out_dtype: torch.dtype, matmul: str = "auto") -> None:
        device = weight.device
        quant_w = quant_scale(amax.to(device))
        input_quant = None if input_amax is None else quant_scale(input_amax.to(device)).reshape(())
        self._setup(quantize_e4m3(weight, quant_w), quant_w, bias, input_quant, out_dtype, matmul)

    def _setup(self, weight: torch.Tensor, quant_w: torch.Tensor, bias: torch.Tensor | None,
               input_quant: torch.Tensor | None, out_dtype: torch.dtype, matmul: str) -> None:
        """Takes the e4m3 ``weight`` and the quant scales as they are (no rounding happens here)."""
        if matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise PlannerSetupError(f"FP8 matmuls need in/out features divisible by 16, got {tuple(weight.shape)}")
        self.quant_w = quant_w
        self.weight = weight
        self.dequant_w = (1.0 / quant_w).reshape(1, -1) if quant_w.numel() > 1 else 1.0 / quant_w
        self.bias = None if bias is None else bias.detach().to(weight.device, out_dtype)
        self.input_quant = input_quant
        self.out_dtype = out_dtype
        self.matmul = ("scaled_mm" if weight.is_cuda else "dequantize") if matmul == "auto" else matmul
        self.per_channel = quant_w.numel() > 1
        if self.matmul == "scaled_mm" and self.per_channel and out_dtype != torch.bfloat16:
            raise PlannerSetupError("per-channel FP8 weights need bfloat16 activations (row-wise scaled_mm)")

    @classmethod
    def concat(cls, parts: Sequence[Fp8Linear]) -> Fp8Linear:
        """One linear whose output is the ``parts``' outputs side by side (q/k/v or gate/up in one GEMM).

        The e4m3 weights are stacked unchanged and a per-tensor scale becomes the same scale on each of its rows,
        so the result is per channel and each output column is what its part computes (up to the GEMM's own
        summation order); a part without bias adds zeros. The parts must share ``in`` features, the activation
        scale (dynamic, or the same static one), ``out_dtype`` and the matmul."""
        if not parts:
            raise PlannerSetupError("Fp8Linear.concat needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if part.weight.shape[1] != first.weight.shape[1]:
                raise PlannerSetupError("Fp8Linear.concat: the parts take different input features "
                                        f"({part.weight.shape[1]} != {first.weight.shape[1]})")
            if (part.out_dtype, part.matmul) != (first.out_dtype, first.matmul):
                raise PlannerSetupError("Fp8Linear.concat: the parts differ in out_dtype or matmul")
            a, b = part.input_quant, first.input_quant
            if (a is None) != (b is None) or (a is not None and b is not None and not torch.equal(a, b)):
                raise PlannerSetupError("Fp8Linear.concat: the parts must share the activation scale "
                                        "(all dynamic, or one static input scale)")
        if first.matmul == "scaled_mm" and first.out_dtype != torch.bfloat16:
            raise PlannerSetupError("Fp8Linear.concat: a concatenated linear has per-channel weight scales, and "
                                    "row-wise scaled_mm needs bfloat16 activations")
        quant_w = torch.cat([p.quant_w.reshape(-1, 1).expand(p.weight.shape[0], 1) for p in parts])
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else
                              torch.zeros(p.weight.shape[0], dtype=first.out_dtype, device=first.weight.device)
                              for p in parts])
        linear = cls.__new__(cls)
        linear._setup(torch.cat([p.weight for p in parts]), quant_w, bias, first.input_quant, first.out_dtype,
                      first.matmul)
        return linear

    @classmethod
    def from_linear(cls, name: str, linear: nn.Linear, *, device: torch.device, out_dtype: torch.dtype,
                    per_channel: bool = True, activation_scale: str = "dynamic", matmul: str = "auto") -> Fp8Linear:
        """From a plain or modelopt-quantized ``nn.Linear``: the quantizers' scales when it has them (then
        ``per_channel`` is theirs), else the weight's own max-abs. ``activation_scale="static"`` needs a
        calibrated input quantizer."""
        if activation_scale not in ACTIVATION_SCALES:
            raise PlannerSetupError(f"activation_scale must be one of {ACTIVATION_SCALES}, got {activation_scale!r}")
        weight = linear.weight.detach().to(device, torch.float32)
        scales = modelopt_scales(name, linear)
        amax = weight_amax(weight, per_channel) if scales is None else scales.weight_amax
        input_amax = None
        if activation_scale == "static":
            if scales is None or scales.input_amax is None:
                raise PlannerSetupError(f"{name}: static FP8 activation scales need a calibrated modelopt input "
                                        "quantizer; use activation_scale='dynamic'")
            input_amax = scales.input_amax
        return cls(weight, amax, linear.bias, input_amax=input_amax, out_dtype=out_dtype, matmul=matmul)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the matmul sees it, float32 ``(out, in)``."""
        scale = self.dequant_w.reshape(-1, 1) if self.per_channel else self.dequant_w
        return self.weight.to(torch.float32) * scale

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: ``(M, 1)`` 0/1 weights of the flattened rows of ``x`` that count for a dynamic scale (a
        padded step's padding rows must not move the scale of the real ones)."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.matmul == "dequantize":
            quant_x = self._quant_x(x2, rows)
            xq = quantize_e4m3(x2, quant_x).to(torch.float32) * (1.0 / quant_x)
            bias = None if self.bias is None else self.bias.to(torch.float32)
            y = F.linear(xq, self.dequantized_weight(), bias).to(self.out_dtype)
        else:
            y = self._scaled_mm(x2, rows)
        return y.reshape(*lead, -1)

    def _quant_x(self, x2: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.input_quant is not None:  # static, from the input quantizer
            return self.input_quant
        return quant_scale((x2.abs() if rows is None else x2.abs() * rows).amax())  # dynamic, on the device

    def _scaled_mm(self, x2: torch.Tensor, rows: torch.Tensor | None, *, triton: bool | None = None) -> torch.Tensor:
        """``triton``: quantize ``x2`` with the Triton kernels (default: on CUDA when triton imports) or with
        torch ops; the two give the same bits."""
        m = x2.shape[0]
        pad_to = 16 if x2.is_cuda else 1  # cuBLASLt's FP8 GEMMs like 16-aligned dimensions
        quantize = _triton_quantizer() if (x2.is_cuda if triton is None else triton) else None
        xq, dequant_x = (quantize or quantize_rows_ref)(x2, quant=self.input_quant, rows=rows, pad_to=pad_to)
        if self.per_channel:  # row-wise scaling: (M, 1) x (1, N)
            y = torch._scaled_mm(xq, self.weight.t(), dequant_x, self.dequant_w, out_dtype=torch.bfloat16)
        else:
            y = torch._scaled_mm(xq, self.weight.t(), dequant_x[:1].reshape(()), self.dequant_w.reshape(()),
                                 out_dtype=self.out_dtype)
        if y.shape[0] != m:
            y = y[:m]
        return y if self.bias is None else y + self.bias


@functools.cache
def _triton_quantizer() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """:func:`blockpilot.kernels.fp8_quant.quantize_rows`, ``None`` without triton."""
    try:
        from ..kernels.fp8_quant import quantize_rows
    except ImportError:
        return None
    return quantize_rows
