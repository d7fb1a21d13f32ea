"""Style-loss guidance in ComfyUI's sigma parameterisation: the loss, the official x̂0 mixing and
the corrected prediction. Pure torch (no comfy).

The official InstantStyle-Plus step (diffusers DDIM, latent z_t, ᾱ = alphas_cumprod[t]):

    x̂0  = (z − √(1−ᾱ)·ε) / √ᾱ
    mix = √(1−ᾱ)·x̂0 + (1 − √(1−ᾱ))·z                  the latent that is decoded and scored
    ε'  = ε − √(1−ᾱ)·(−∂L/∂z)                           classifier guidance with log p = −L

ComfyUI samples x = z/√ᾱ = x0 + σ·ε with σ = √((1−ᾱ)/ᾱ), so ᾱ = 1/(1+σ²), √(1−ᾱ) = σ/√(1+σ²),
and the model returns the denoised D = x − σ·ε (= x̂0). Substituting:

    mix = c·D + (1 − c)·x/√(1+σ²),   c = σ/√(1+σ²)
    ∂L/∂z = ∂L/∂x / √ᾱ,  so ε' = ε + σ·∂L/∂x  and  D' = x − σ·ε' = D − σ²·∂L/∂x

i.e. the k-diffusion form of classifier guidance (score (D − x)/σ² plus ∇ log p). Any sampler
then steps with D'. tests/unit/test_style_loss.py checks the equivalence against the ε/ᾱ form
written out independently.
"""
from __future__ import annotations

import torch


def _rows(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ per batch row, broadcastable to `like` ([B, C, H, W])."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(like.shape[0])
    return sigma.view(-1, *([1] * (like.ndim - 1)))


def official_mix(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The latent InstantStyle-Plus decodes, c·D + (1 − c)·√ᾱ·x with c = √(1−ᾱ), in sigma terms.

    Shapes: denoised, x [B, C, H, W]; sigma [B] or scalar -> [B, C, H, W].
    """
    s = _rows(sigma, x)
    root = torch.sqrt(1.0 + s * s)
    c = s / root
    return c * denoised + (1.0 - c) * x / root


def style_loss(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 − cos(style(x̂0), style(reference)) per generated image, averaged over the references.

    The official loss is −⟨e, e_ref⟩ of unit vectors: the same gradient. Summing (not averaging)
    over the batch keeps each image's gradient independent of the batch size.
    Shapes: embeddings [N, D], reference [R, D] -> [N].
    """
    e = torch.nn.functional.normalize(embeddings, dim=-1)
    r = torch.nn.functional.normalize(reference.to(e), dim=-1)
    return 1.0 - (e @ r.T).mean(dim=-1)


def guided_denoised(denoised: torch.Tensor, grad_x: torch.Tensor, sigma: torch.Tensor, scale: float) -> torch.Tensor:
    """D' = D − scale·σ²·∂L/∂x: the official ε' = ε − √(1−ᾱ)·(−scale·∂L/∂z) in sigma terms.

    Shapes: denoised, grad_x [B, C, H, W]; sigma [B] or scalar -> [B, C, H, W].
    """
    s = _rows(sigma, denoised)
    return denoised - scale * s * s * grad_x.to(denoised.dtype)
