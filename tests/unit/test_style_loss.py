"""Style-loss guidance math: the sigma-form update against the official ε/ᾱ form written out."""
from __future__ import annotations

import math

import torch

from stylekit.sampling.style_loss import guided_denoised, official_mix, style_loss


def _toy_loss(latent: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for decode -> discriminator -> 1 − cos."""
    e = torch.tanh(latent.flatten(1) @ weights)
    return (1.0 - torch.nn.functional.cosine_similarity(e, torch.ones_like(e), dim=-1)).sum()


def _official_step(z, alpha_bar, eps_model, loss_fn, scale):
    """InstantStyle-Plus cond_fn on DDIM latents, as its code reads (gradient through ε(z))."""
    z = z.detach().requires_grad_(True)
    eps = eps_model(z)
    beta = 1.0 - alpha_bar
    x0 = (z - beta**0.5 * eps) / alpha_bar**0.5
    fac = math.sqrt(beta)
    sample = x0 * fac + z * (1 - fac)
    grads = -torch.autograd.grad(loss_fn(sample) * scale, z)[0]
    eps_new = eps.detach() - beta**0.5 * grads
    return (z.detach() - beta**0.5 * eps_new) / alpha_bar**0.5, sample.detach()


def test_sigma_form_update_equals_the_official_eps_update():
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(4 * 3 * 3, 5, generator=g, dtype=torch.float64) * 0.3
    mix_matrix = torch.randn(36, 36, generator=g, dtype=torch.float64) * 0.05
    eps_model = lambda z: torch.tanh((z.flatten(1) @ mix_matrix).view_as(z))  # a UNet stand-in of z
    loss_fn = lambda latent: _toy_loss(latent, weights)
    for alpha_bar in (0.9, 0.3, 0.02):
        z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
        expected_x0, expected_mix = _official_step(z, alpha_bar, eps_model, loss_fn, scale=7.0)

        sigma = torch.full((2,), math.sqrt((1 - alpha_bar) / alpha_bar), dtype=torch.float64)
        x = (z / alpha_bar**0.5).requires_grad_(True)             # ComfyUI's x = z/√ᾱ
        denoised = x - sigma.view(-1, 1, 1, 1) * eps_model(x * alpha_bar**0.5)
        mix = official_mix(denoised, x, sigma)
        (grad,) = torch.autograd.grad(loss_fn(mix), x)
        ours = guided_denoised(denoised.detach(), grad, sigma, scale=7.0)

        torch.testing.assert_close(mix.detach(), expected_mix, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, expected_x0, rtol=1e-10, atol=1e-10)


def test_scale_zero_is_the_identity():
    d = torch.randn(2, 4, 8, 8)
    assert torch.equal(guided_denoised(d, torch.randn_like(d), torch.tensor([3.0, 3.0]), 0.0), d)


def test_style_loss_is_one_minus_cosine_averaged_over_references():
    g = torch.Generator().manual_seed(1)
    e, r = torch.randn(3, 16, generator=g), torch.randn(2, 16, generator=g)
    expected = torch.stack([1 - torch.stack([torch.nn.functional.cosine_similarity(e[i], r[j], dim=0)
                                             for j in range(2)]).mean() for i in range(3)])
    torch.testing.assert_close(style_loss(e, r), expected)
    assert float(style_loss(r[:1], r[:1])) < 1e-6
