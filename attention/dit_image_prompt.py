"""Image-prompt terms of DiT IP-Adapters: XLabs' Flux adapter and InstantX's SD3.5-Large adapter.

XLabs Flux IP-Adapter (as diffusers 0.39's FluxIPAdapterAttnProcessor computes it), double
blocks only: the query is the image stream's query after the block's QK-norm and *before*
RoPE; each adapter i attends over its own image tokens, K'_i = to_k_ip(e_i), V'_i = to_v_ip(e_i):
    out_ip = Σ_i w_i · m_i ⊙ Attn(Q_img, K'_i, V'_i)
and out_ip is added to the image stream after the block's MLP residual, without gate and
without output projection (`img = img + out_ip`). diffusers accepts masks for it and ignores
them; m_i here is a per-token mask (1 everywhere by default): tokens outside it get exactly 0.

InstantX SD3.5-Large IP-Adapter (SD3IPAdapterJointAttnProcessor2_0): in every joint block the
adapter attends from the image tokens over the image tokens *and* the IP tokens, with its own
RMS norms: q = n_q(Q_x), K = [n_k(K_x); n_ipk(K_ip)], V = [V_x; V_ip], where Q_x, K_x, V_x are the
block's raw x-stream projections (before the block's own ln_q/ln_k) and K_ip, V_ip = to_{k,v}_ip
of the AdaLN-normalised IP tokens; w · m ⊙ Attn(q, K, V) is added to the x part of the joint
attention output before the output projection.

The kernel `attention(q, k, v)` is the caller's, on [B, N, heads·dim_head] in and out.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .decoupled import ImageKV, image_attention

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H·D], the layout the kernels take."""
    return x.transpose(1, 2).flatten(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight, statistics in fp32
    (as diffusers' and core's RMSNorm). Shapes: x [..., D], weight [D] or None -> [..., D]."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.float()
    return normed.to(x.dtype)


def flux_ip_attention(q_image: torch.Tensor, terms: Sequence[ImageKV], attention: Attention) -> torch.Tensor | None:
    """XLabs Flux IP-Adapter term Σ_i w_i · m_i ⊙ Attn(Q_img, K'_i, V'_i) (diffusers' processor).

    q_image is the image stream's query after QK-norm, before RoPE. None when every weight is 0
    (the block is then exactly the plain one). Add the result to the image stream after the MLP
    residual, ungated. Shapes: q_image [B, H, N, D]; terms' k, v [B or 1, T, H·D], masks
    broadcastable to [B, N, 1] -> [B, N, H·D].
    """
    return image_attention(merge_heads(q_image), terms, attention)


def flux_ip_attention_split(q_image: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor, weight: float,
                            attention_split: Callable, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """flux_ip_attention for one adapter, heads kept apart: w · m ⊙ Attn(Q_img, K', V').

    The kernel takes q, k, v as [B, H, L, D] and returns [B, N, H·D] (core's attention with
    skip_reshape), so the query is not merged into [B, N, H·D] and split again, and w scales V'
    (T tokens) instead of the output (N tokens): Attn(q, K', w·V') = w · Attn(q, K', V'). None when
    w is 0. Shapes: q_image [B, H, N, D]; k_ip, v_ip [B, H, T, D]; mask broadcastable to [B, N, 1].
    """
    if weight == 0:
        return None
    out = attention_split(q_image, k_ip, v_ip * weight)
    return out if mask is None else out * mask.to(out.dtype)


def joint_ip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ip_k: torch.Tensor, ip_v: torch.Tensor,
                       weight: float, attention: Attention, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """InstantX SD3.5 IP term w · m ⊙ Attn(q, [k; ip_k], [v; ip_v]) (diffusers' SD3 IP processor).

    q, k, ip_k are already normalised by the adapter's RMS norms (rms_norm per head). None when
    the weight is 0. Add the result to the x part of the joint attention output, before the
    output projection. Shapes: q, k, v [B, N, H·D]; ip_k, ip_v [B or 1, T, H·D]; mask
    broadcastable to [B, N, 1] -> [B, N, H·D].
    """
    if weight == 0:
        return None
    batch = q.shape[0]
    ip_k = ip_k.expand(batch, -1, -1) if ip_k.shape[0] != batch else ip_k
    ip_v = ip_v.expand(batch, -1, -1) if ip_v.shape[0] != batch else ip_v
    out = attention(q, torch.cat([k, ip_k], dim=1), torch.cat([v, ip_v], dim=1)) * weight
    return out if mask is None else out * mask.to(out.dtype)
