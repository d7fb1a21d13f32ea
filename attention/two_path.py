"""Two-path cross-attention (StyleAdapter, Wang et al. 2023, TPCA).

F = Attn(Q, K_txt, V_txt) + λ·Attn(Q, K_s, V_s): the prompt keeps its own path (the UNet's text
K/V), and the style tokens get a second path with their own projections K_s = s·W'k, V_s = s·W'v
and their own scale λ, so the style cannot crowd the prompt out of one softmax. With one style
term this is exactly IP-Adapter's decoupled cross-attention (eq. 5), which is why StyleKit runs
TPCA on the IP-Adapter patch; this function names the operation and is what the layer is
checked against.
"""
from __future__ import annotations

import torch

from .decoupled import Attention, ImageKV, decoupled_cross_attention


def two_path_cross_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, k_style: torch.Tensor,
                             v_style: torch.Tensor, scale: float, attention: Attention) -> torch.Tensor:
    """Attn(Q, K_txt, V_txt) + λ·Attn(Q, K_s, V_s) (StyleAdapter TPCA); λ = 0 is the text path exactly.

    Shapes: q [B, N, H·D]; k_text, v_text [B, M, H·D]; k_style, v_style [B or 1, T, H·D] -> [B, N, H·D].
    """
    return decoupled_cross_attention(q, k_text, v_text, [ImageKV(k_style, v_style, scale)], attention)
