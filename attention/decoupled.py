"""Decoupled cross-attention: the text attention plus weighted attentions over image keys/values.

IP-Adapter (Ye et al. 2023, eq. 5): Z = softmax(QKᵀ/√d)V + λ·softmax(QK'ᵀ/√d)V', where K' and V'
come from image tokens through the adapter's own projections W'k, W'v. With several adapters the
image terms add up (diffusers' multi-adapter processor does the same), and an optional spatial
mask m restricts each term to a region: Z = Attn(Q, K, V) + Σ_i w_i · m_i ⊙ Attn(Q, K'_i, V'_i).

The attention kernel is passed in, so the caller keeps the host's backend; it takes q, k, v as
[batch, tokens, heads · dim_head] and returns the same layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImageKV:
    """One image term: keys and values of the image tokens, its weight and an optional mask.

    Shapes: k, v [B, T, H·D] (or [1, T, H·D], broadcast over the batch); mask broadcastable to
    [B, N, 1] (one value per query token), None for everywhere.
    """
    k: torch.Tensor
    v: torch.Tensor
    weight: float
    mask: torch.Tensor | None = None


def image_attention(q: torch.Tensor, terms: Sequence[ImageKV], attention: Attention) -> torch.Tensor | None:
    """Σ_i w_i · m_i ⊙ Attn(Q, K'_i, V'_i), the image part of decoupled cross-attention (IP-Adapter eq. 5).

    Terms with weight 0 are skipped without computing anything; None when no term is left, so
    weight 0 is an exact identity for the caller. Shapes: q [B, N, H·D] -> [B, N, H·D].
    """
    total = None
    for term in terms:
        if term.weight == 0:
            continue
        k = term.k.expand(q.shape[0], -1, -1) if term.k.shape[0] != q.shape[0] else term.k
        v = term.v.expand(q.shape[0], -1, -1) if term.v.shape[0] != q.shape[0] else term.v
        out = attention(q, k, v) * term.weight
        if term.mask is not None:
            out = out * term.mask.to(out.dtype)
        total = out if total is None else total + out
    return total


def add_image_attention(text_out: torch.Tensor, q: torch.Tensor, terms: Sequence[ImageKV],
                        attention: Attention) -> torch.Tensor:
    """text_out + Σ_i w_i · m_i ⊙ Attn(Q, K'_i, V'_i): the image terms added to an attention result
    computed elsewhere (another patch's, or the host's). Returns text_out itself when every weight is 0."""
    extra = image_attention(q, terms, attention)
    return text_out if extra is None else text_out + extra.to(text_out.dtype)


def decoupled_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Sequence[ImageKV],
                              attention: Attention) -> torch.Tensor:
    """Attn(Q, K, V) + Σ_i w_i · m_i ⊙ Attn(Q, K'_i, V'_i) (IP-Adapter, Ye et al. 2023, eq. 5).

    Shapes: q [B, N, H·D]; k, v [B, M, H·D] (text); image terms as in ImageKV -> [B, N, H·D].
    """
    return add_image_attention(attention(q, k, v), q, terms, attention)
