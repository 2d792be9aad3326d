"""Merging attention states: partial softmax-weighted sums over disjoint key sets, each with its log-sum-exp.

An attention state of a query over a key set ``S`` is ``(o, lse)``: ``o = sum_{k in S} softmax_S(s)_k v_k`` (the
normalised output over ``S`` alone) and ``lse = log sum_{k in S} exp(s_k)`` (natural log, float32). Two states
over disjoint sets merge into the state over their union:
``lse = log(exp(lse_a) + exp(lse_b))`` and ``o = (exp(lse_a - lse) o_a + exp(lse_b - lse) o_b)``, computed after
subtracting ``max(lse_a, lse_b)``. An empty set is ``lse = -inf`` with any ``o``: it weighs nothing, and a merge
of empty states is the empty state ``(0, -inf)`` (the block-attention kernel's zeros for a query that sees no key).

:func:`merge_splits_` folds the ``splits`` partial states of a split-KV launch of
:func:`blockpilot.kernels.block_attention.block_diffusion_attention` into its output; :func:`merge_attention_states`
merges two states (a cached prefix's attention with an in-block part, say), and
:func:`merge_attention_states_ref` is the same in plain torch. Importing this module needs ``triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_splits_kernel(PART, PART_LSE, OUT, LSE, stride_ph, stride_pt, stride_ps, stride_qh, stride_qt, stride_qs,
                         stride_oh, stride_ot, stride_lh, stride_lt, HEAD_DIM, SPLITS,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr):
    # One program per (head, position): every split's state is loaded at once (one round trip to memory, not
    # one per split: a loop over the splits made this launch cost more than the attention it merges).
    head = tl.program_id(0)
    t = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    lse = tl.load(PART_LSE + head * stride_qh + t * stride_qt + offs_s * stride_qs, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights 0, the output 0
    w = tl.exp(lse - m_safe)
    ok = s_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    part = tl.load(PART + head * stride_ph + t * stride_pt + offs_s[:, None] * stride_ps + offs_d[None, :], mask=ok,
                   other=0.0)
    acc = tl.sum(tl.where(w[:, None] > 0.0, w[:, None] * part, 0.0), axis=0)  # an empty split weighs nothing
    denom = tl.sum(w, axis=0)
    safe = tl.where(denom > 0.0, denom, 1.0)
    tl.store(OUT + head * stride_oh + t * stride_ot + offs_d, (acc / safe).to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        tl.store(LSE + head * stride_lh + t * stride_lt, tl.where(denom > 0.0, m_safe + tl.log(safe), float("-inf")))


@triton.jit
def _merge_pair_kernel(OUT_A, LSE_A, OUT_B, LSE_B, OUT, LSE, stride_a, stride_b, stride_o, ROWS, HEAD_DIM,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < ROWS
    ok = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    lse_a = tl.load(LSE_A + offs_r, mask=r_ok, other=float("-inf"))
    lse_b = tl.load(LSE_B + offs_r, mask=r_ok, other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_safe)
    w_b = tl.exp(lse_b - m_safe)
    o_a = tl.load(OUT_A + offs_r[:, None] * stride_a + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    o_b = tl.load(OUT_B + offs_r[:, None] * stride_b + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    # An empty state weighs nothing, whatever its output holds (a NaN from a softmax over nothing included).
    acc = tl.where(w_a[:, None] > 0.0, w_a[:, None] * o_a, 0.0) + tl.where(w_b[:, None] > 0.0, w_b[:, None] * o_b, 0.0)
    denom = w_a + w_b
    safe = tl.where(denom > 0.0, denom, 1.0)
    tl.store(OUT + offs_r[:, None] * stride_o + offs_d[None, :], (acc / safe[:, None]).to(OUT.dtype.element_ty),
             mask=ok)
    tl.store(LSE + offs_r, tl.where(denom > 0.0, m_safe + tl.log(safe), float("-inf")), mask=r_ok)


def merge_splits_(part: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Fold the partial states ``part`` ``(H, T, S, D)`` / ``part_lse`` ``(H, T, S)`` (float32, last dims
    contiguous) into ``out`` ``(1, H, T, D)`` (any float dtype) and, when given, ``lse`` ``(1, H, T)`` float32."""
    heads, t, splits, head_dim = part.shape
    if heads * t:
        _merge_splits_kernel[(heads, t)](
            part, part_lse, out, out if lse is None else lse, part.stride(0), part.stride(1), part.stride(2),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), out.stride(1), out.stride(2),
            0 if lse is None else lse.stride(1), 0 if lse is None else lse.stride(2), head_dim, splits,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            WRITE_LSE=lse is not None,
        )


def _check_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    if out_a.shape != out_b.shape or out_a.dim() < 1:
        raise ValueError(f"the two outputs must share one shape (..., D), got {tuple(out_a.shape)} and "
                         f"{tuple(out_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:-1]:
            raise ValueError(f"{name} must be {tuple(out_a.shape[:-1])} (the outputs' shape without D), got "
                             f"{tuple(lse.shape)}")
    if len({out_a.device, out_b.device, lse_a.device, lse_b.device}) != 1:
        raise ValueError("the two states must be on one device")


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The state ``(out, lse)`` over the union of two disjoint key sets, from their states: ``out_*`` ``(..., D)``
    (any float dtype; ``out`` takes ``out_a``'s), ``lse_*`` ``(...)`` natural-log log-sum-exp (``-inf``: an empty
    set). Returns ``out`` like ``out_a`` and ``lse`` float32. Triton kernel of :func:`merge_attention_states_ref`."""
    _check_states(out_a, lse_a, out_b, lse_b)
    head_dim = out_a.shape[-1]
    rows = out_a.numel() // max(1, head_dim)
    a, b = (x.reshape(rows, head_dim) for x in (out_a, out_b))
    a, b = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, b))
    la, lb = (x.reshape(rows).to(torch.float32).contiguous() for x in (lse_a, lse_b))
    out = torch.empty(rows, head_dim, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(rows, dtype=torch.float32, device=out_a.device)
    if rows and head_dim:
        block_r = 16
        _merge_pair_kernel[(triton.cdiv(rows, block_r),)](
            a, la, b, lb, out, lse, a.stride(0), b.stride(0), out.stride(0), rows, head_dim,
            BLOCK_R=block_r, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        )
    return out.reshape(out_a.shape), lse.reshape(out_a.shape[:-1])


def merge_attention_states_ref(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_attention_states` in plain torch (float32 math; ``out`` in ``out_a``'s dtype)."""
    _check_states(out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(la - m_safe)[..., None], torch.exp(lb - m_safe)[..., None]
    acc = torch.where(w_a > 0, w_a * out_a.float(), 0.0) + torch.where(w_b > 0, w_b * out_b.float(), 0.0)
    denom = w_a + w_b
    out = acc / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = torch.where(denom[..., 0] > 0, m_safe + torch.log(denom[..., 0]), torch.full_like(m, float("-inf")))
    return out.to(out_a.dtype), lse
