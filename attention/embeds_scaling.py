"""How the image term's weight enters decoupled cross-attention: the "embeds scaling" modes of the
incumbent ComfyUI IP-Adapter pack, on image keys/values K', V' of width C (the layer's channels).

    V only                   Z_img = w · Attn(Q, K', V')                  (the paper's λ; the default)
    K+V                      Z_img = Attn(Q, w·K', w·V')
    K+V w/ C penalty         w_c = w · C / 1280;  Z_img = Attn(Q, w_c·K', w_c·V')
    K+mean(V) w/ C penalty   w_c = w · C / 1280;  Z_img = Attn(Q, w_c·K', (V' − mean(V')) + w_c·mean(V'))

mean(V') is over the image tokens. Scaling K sharpens or flattens the attention over the image
tokens; the C penalty weakens the narrow (high-resolution) layers, whose C is below 1280. A weight
may be a number or a tensor broadcastable to [B, 1, 1] (one weight per batch row).
"""
from __future__ import annotations

import torch

EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
PENALTY_WIDTH = 1280.0


def scale_image_kv(k: torch.Tensor, v: torch.Tensor, weight, mode: str = "V only"):
    """(K'', V'', w_out) such that Z_img = w_out · Attn(Q, K'', V'') is the mode's image term.

    k, v: [B, T, C]; weight: a number or a tensor broadcastable to [B, 1, 1]."""
    if mode == "V only":
        return k, v, weight
    if mode not in EMBEDS_SCALING:
        raise ValueError(f"unknown embeds scaling {mode!r}; choose one of {', '.join(EMBEDS_SCALING)}")
    w = weight
    if mode != "K+V":
        w = weight * (k.shape[-1] / PENALTY_WIDTH)
    if mode == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=1, keepdim=True)
        return k * w, (v - mean) + mean * w, 1.0
    return k * w, v * w, 1.0
