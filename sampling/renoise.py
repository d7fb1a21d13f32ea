"""ReNoise inversion (Garibi et al. 2024) as InstantStyle-Plus runs it, on DDIM latents (pure torch).

Each inversion step t solves the implicit DDIM inversion step by re-noising: ε is re-evaluated at
the current estimate of z_t (renoise steps), the estimates of a chosen range of iterations are
averaged, and the noise is regularised towards a Gaussian (an auto-correlation loss over rolled
copies and a patch KL loss against the prediction at the forward-noised input). The settings are
those of InstantStyle-Plus's infer_style.py (its src/config.py with 1 renoise step, no CFG, no
noise correction); with 1 renoise step the regularisation and the averaging only act in the
steps below timestep 250, the others are one fixed-point iteration.

`renoise_step` works on DDIM latents z with a noise predictor eps(z, level); the sampler glue
(sampling/inversion.py) gives it the model evaluated so that the UNet sees z at the level's
timestep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ReNoiseSettings:
    """InstantStyle-Plus's ReNoise configuration (src/config.py + infer_style.py)."""
    renoise_steps: int = 1
    max_renoise_steps_first: int = 5
    first_range_timestep: int = 250          # steps below this timestep use the "first" ranges
    average_first_range: tuple[int, int] = (0, 5)
    average_range: tuple[int, int] = (8, 10)
    lambda_ac: float = 20.0
    lambda_kl: float = 0.065
    reg_steps: int = 4
    ac_rolls: int = 5


def auto_correlation_loss(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Σ over channels and a pyramid of 2× average-pooled levels (down to 8 px) of the squared mean
    product of the noise with itself rolled by a random amount along each spatial axis. [1, C, H, W]."""
    loss = noise.new_zeros(())
    for channel in range(noise.shape[1]):
        level = noise[:, channel:channel + 1]
        while True:
            roll = int(torch.randint(0, level.shape[2] // 2, (1,), generator=generator))
            loss = loss + (level * torch.roll(level, shifts=roll, dims=2)).mean() ** 2
            loss = loss + (level * torch.roll(level, shifts=roll, dims=3)).mean() ** 2
            if level.shape[2] <= 8:
                break
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def patch_kl_loss(noise: torch.Tensor, target: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Σ over 4×4 patches (all channels) of |KL| between per-channel Gaussians fitted to the patch
    of `noise` and of `target` (unbiased variances, eps 1e-6). [1, C, H, W] each."""
    def patches(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[1]
        p = t.unfold(2, patch, patch).unfold(3, patch, patch)          # [1, C, H/p, W/p, p, p]
        return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, patch * patch)
    x, y = patches(noise), patches(target)
    eps = 1e-6
    mu0, mu1, var0, var1 = x.mean(-1), y.mean(-1), x.var(-1), y.var(-1)
    kl = torch.log((var1 + eps) / (var0 + eps)) + (var0 + (mu0 - mu1) ** 2) / (var1 + eps) - 1
    return kl.abs().sum()


def regularise_noise(e: torch.Tensor, target: torch.Tensor, settings: ReNoiseSettings,
                     generator: torch.Generator) -> torch.Tensor:
    """Gradient steps on the predicted noise: λ_KL on the patch KL (gradient clipped to ±100), then
    λ_AC on the auto-correlation loss, averaged over `ac_rolls` random rolls; `reg_steps` rounds.
    Each row of the batch is regularised on its own. Needs autograd enabled."""
    rows = []
    for b in range(e.shape[0]):
        x, ref = e[b:b + 1].detach(), target[b:b + 1].detach()
        for _ in range(settings.reg_steps):
            if settings.lambda_kl > 0:
                var = x.clone().requires_grad_(True)
                grad, = torch.autograd.grad(patch_kl_loss(var, ref), var)
                x = x - settings.lambda_kl * grad.clamp(-100, 100)
            if settings.lambda_ac > 0:
                for _ in range(settings.ac_rolls):
                    var = x.detach().clone().requires_grad_(True)
                    grad, = torch.autograd.grad(auto_correlation_loss(var, generator), var)
                    x = x - settings.lambda_ac * grad / settings.ac_rolls
            x = x.detach()
        rows.append(x)
    return torch.cat(rows)


def ddim_inverse_step(z: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """z at level alpha_to from z at alpha_from with the noise eps (DDIM, η = 0)."""
    x0 = (z - (1 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
    return alpha_to ** 0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


def renoise_step(eps: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, z_forward: torch.Tensor,
                 alpha_from: float, alpha_to: float, first_range: bool, settings: ReNoiseSettings,
                 generator: torch.Generator, autograd: Callable) -> torch.Tensor:
    """One ReNoise inversion step from z (level alpha_from) to level alpha_to.

    eps(z) predicts the noise at the destination level (batched: rows may be stacked);
    z_forward = √ᾱ_to·z0 + √(1−ᾱ_to)·noise gives the regulariser's target prediction;
    first_range: the destination timestep is below `first_range_timestep`.
    `autograd` is a context manager that enables gradients (the host runs under inference mode)."""
    start, stop = settings.average_first_range if first_range else settings.average_range
    renoise = min(settings.max_renoise_steps_first, settings.renoise_steps) if first_range else settings.renoise_steps
    average, target = None, None
    estimate = z
    for i in range(renoise + 1):
        if i == 0:
            both = eps(torch.cat([z_forward, estimate]))
            target, e = both[:z.shape[0]], both[z.shape[0]:]
        else:
            e = eps(estimate)
        if start <= i < stop:
            j = i - start
            average = e.clone() if average is None else j * average / (j + 1) + e / (j + 1)
        if i >= start:
            with autograd():
                regularised = regularise_noise(e, target, settings, generator)
            if not torch.isnan(regularised).any():
                e = regularised
        estimate = ddim_inverse_step(z, e, alpha_from, alpha_to)
    if average is not None:
        with autograd():
            average = regularise_noise(average, target, settings, generator)
        estimate = ddim_inverse_step(z, average, alpha_from, alpha_to)
    return estimate
