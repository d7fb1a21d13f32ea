"""Spatial masks on attention outputs: a [M, H, W] mask resized to the token grid of one UNet level."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of the UNet level that has n_tokens tokens, for a latent of latent_hw.

    Each level halves both sides and rounds up (ComfyUI's and diffusers' downsampling convs use
    stride 2 with padding 1), so a 13x9 latent has levels 13x9, 7x5, 4x3, 2x2.
    """
    h, w = latent_hw
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens is no level of a {latent_hw[0]}x{latent_hw[1]} latent")
    return h, w


def mask_to_tokens(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a mask to a token grid, one weight per query token.

    Each token gets the mean of the mask over its area (box filter): no overshoot, no bleeding
    across token boundaries, soft edges stay soft.
    Shapes: mask [M, H, W] -> [M, h·w, 1], tokens in row-major (h w) order like the transformer's.
    """
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="area")
    return rearrange(resized, "m 1 h w -> m (h w) 1")
