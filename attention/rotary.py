"""Rotary position embeddings (RoPE, Su et al. 2021) in the layout Flux's attention uses.

Flux rotates each (even, odd) channel pair of a head by an angle p·ω_i, with one block of
pairs per position axis (index, row, column; `axes_dim` channels each) and ω_i = θ^(−2i/d) for
the i-th pair of an axis of d channels. A rotation is stored as one 2×2 matrix per pair:
[..., tokens, dim_head/2, 2, 2] (the `pe` tensor of Flux blocks).

Rotations by angles add up and commute (R(a)·R(b) = R(a + b)), so keys that already carry
positions p are moved to p + δ by one constant rotation R(δ): no pre-RoPE keys are needed.
"""
from __future__ import annotations

from typing import Sequence

import torch


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Apply a rotary rotation to each (even, odd) channel pair, in fp32, back in x's dtype.

    Shapes: x [..., N, D]; rotation [..., N or 1, D/2, 2, 2] broadcastable to x -> [..., N, D].
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., N, D/2, 2]
    rotated = (rotation.float() @ pairs.unsqueeze(-1)).squeeze(-1)
    return rotated.flatten(-2).to(x.dtype)


def axis_rotation(offsets: Sequence[float], axes_dim: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """R(δ): the constant rotation that moves every token by `offsets[a]` along position axis a.

    Flux (dev, schnell, Kontext) uses axes_dim [16, 56, 56] (index, row, column) and θ = 10000.
    Shapes: -> [1, 1, 1, sum(axes_dim)/2, 2, 2], broadcast over batch, heads and tokens.
    """
    if len(offsets) != len(axes_dim):
        raise ValueError(f"{len(offsets)} offsets for {len(axes_dim)} position axes")
    angles = []
    for offset, dim in zip(offsets, axes_dim):
        if dim % 2:
            raise ValueError(f"a rotary axis needs an even number of channels, not {dim}")
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        angles.append(float(offset) * theta ** -exponents)
    angle = torch.cat(angles)
    cos, sin = angle.cos(), angle.sin()
    matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return matrix.float().view(1, 1, 1, -1, 2, 2)
