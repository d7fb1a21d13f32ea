"""Shared self-attention (StyleAligned, Hertz et al. 2024) and K/V swapping (Visual Style Prompting,
Jeong et al. 2024), on projected features in the layout ComfyUI's attention kernels take.

Every row of a batch names its reference row (`reference_rows[i]`); a row that is its own
reference is a reference row and gets plain self-attention, exactly. The kernel is passed in
(`attention(q, k, v, mask)` on [B, N, heads·dim_head]) so the caller keeps the user's backend.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .adain import adain

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _rows(reference_rows: Sequence[int] | torch.Tensor, batch: int, device) -> torch.Tensor:
    rows = torch.as_tensor(reference_rows, dtype=torch.long, device=device)
    if rows.shape != (batch,):
        raise ValueError(f"reference_rows has {rows.numel()} entries for a batch of {batch} rows")
    return rows


def key_bias(own_tokens: int, reference_tokens: int, shift: float, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """Additive logit bias [0…0, β…β] over the concatenated keys, shaped [1, 1, keys] so every
    ComfyUI attention backend broadcasts it over batch, heads and queries without materialising it."""
    bias = torch.zeros(1, 1, own_tokens + reference_tokens, dtype=dtype, device=device)
    bias[..., own_tokens:] = shift
    return bias


def shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     reference_rows: Sequence[int] | torch.Tensor, attention: Attention, *,
                     adain_queries: bool = True, adain_keys: bool = True, adain_values: bool = False,
                     score_scale: float = 1.0, score_shift: float = 0.0) -> torch.Tensor:
    """StyleAligned shared attention: O_t = softmax([Q̂K̂_tᵀ, s·Q̂K_rᵀ]/√d + [0, β])·[V̂_t; V_r].

    Q̂, K̂, V̂ are AdaIN-normalised to the reference row's statistics (each optional), s is
    shared_score_scale, β shared_score_shift. A reference row stays plain self-attention.
    Shapes: q, k, v [B, N, heads·dim_head]; reference_rows [B] -> [B, N, heads·dim_head].
    """
    batch = q.shape[0]
    refs = _rows(reference_rows, batch, q.device)
    is_reference = refs == torch.arange(batch, device=q.device)
    if bool(is_reference.all()):
        return attention(q, k, v, None)

    out = torch.empty(v.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    ref_idx = is_reference.nonzero().squeeze(1)
    out[ref_idx] = attention(q[ref_idx], k[ref_idx], v[ref_idx], None)

    tgt_idx = (~is_reference).nonzero().squeeze(1)
    src = refs[tgt_idx]
    q_t, k_t, v_t = q[tgt_idx], k[tgt_idx], v[tgt_idx]
    q_r, k_r, v_r = q[src], k[src], v[src]
    if adain_queries:
        q_t = adain(q_t, q_r)
    if adain_keys:
        k_t = adain(k_t, k_r)
    if adain_values:
        v_t = adain(v_t, v_r)
    keys = torch.cat([k_t, k_r * score_scale if score_scale != 1.0 else k_r], dim=1)
    values = torch.cat([v_t, v_r], dim=1)
    mask = None if score_shift == 0.0 else key_bias(k_t.shape[1], k_r.shape[1], score_shift, q.dtype, q.device)
    out[tgt_idx] = attention(q_t, keys, values, mask)
    return out


def swap_kv(k: torch.Tensor, v: torch.Tensor,
            reference_rows: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual Style Prompting's swap: every row's self-attention keys and values *replaced*
    (not concatenated) by its reference row's; queries stay. A reference row keeps its own.

    Shapes: k, v [B, N, C]; reference_rows [B] -> k', v' [B, N, C].
    """
    refs = _rows(reference_rows, k.shape[0], k.device)
    return k.index_select(0, refs), v.index_select(0, refs)


def swapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      reference_rows: Sequence[int] | torch.Tensor, attention: Attention) -> torch.Tensor:
    """O = softmax(Q K_rᵀ/√d)·V_r (Visual Style Prompting, swapping self-attention). Shapes: as swap_kv, -> [B, N, C]."""
    k_r, v_r = swap_kv(k, v, reference_rows)
    return attention(q, k_r, v_r, None)
