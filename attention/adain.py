"""Adaptive instance normalisation (Huang & Belongie 2017) as StyleAligned and VSP use it.

Statistics are always reduced in fp32 (the official StyleAligned code reduces in fp16, which
loses the variance of long token sequences) and the result is returned in the input dtype.
"""
from __future__ import annotations

import torch


def mean_std(x: torch.Tensor, eps: float = 1e-5, dim: int | tuple[int, ...] = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and σ = sqrt(unbiased variance + eps) over `dim`, in fp32 (kept dims).

    A single token has no unbiased variance; it gets variance 0 (σ = √eps) instead of NaN, which
    tiny latents reach at the UNet's lowest level. Shapes: x [..., N, C] -> mean, std [..., 1, C].
    """
    x = x.float()
    dims = (dim,) if isinstance(dim, int) else dim
    count = 1
    for d in dims:
        count *= x.shape[d]
    variance = x.var(dim=dim, keepdim=True, correction=1 if count > 1 else 0)
    return x.mean(dim=dim, keepdim=True), (variance + eps).sqrt()


def adain(x: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN(x, y) = σ_y·(x − μ_x)/σ_x + μ_y over the token axis (StyleAligned, Hertz et al. 2024).

    Statistics per batch element and per channel; with projected attention features
    [B, N, heads·dim_head] a channel is one (head, channel) pair, as the paper defines it.
    Shapes: x [B, N, C], reference [B, M, C] (or broadcastable over B) -> [B, N, C].
    """
    mu_x, sigma_x = mean_std(x, eps)
    mu_y, sigma_y = mean_std(reference, eps)
    return ((x.float() - mu_x) / sigma_x * sigma_y + mu_y).to(x.dtype)


def match_channel_stats(x: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Channel AdaIN of a latent to a reference latent: VSP's colour calibration of predicted x0.

    As the official Visual Style Prompting scheduler ("channel" fit mode): per sample and channel
    over the spatial axes, (x − μ_x)/(σ_x + eps)·σ_r + μ_r with the unbiased standard deviation.
    Shapes: x [B, C, H, W], reference [1 or B, C, H', W'] -> [B, C, H, W].
    """
    dims = tuple(range(2, x.ndim))
    xf, rf = x.float(), reference.float()
    normalised = (xf - xf.mean(dim=dims, keepdim=True)) / (xf.std(dim=dims, keepdim=True) + eps)
    return (normalised * rf.std(dim=dims, keepdim=True) + rf.mean(dim=dims, keepdim=True)).to(x.dtype)
