"""DreamBooth's objective in the model's own prediction space (Ruiz et al. 2023, eq. 2).

ComfyUI models return the denoised estimate D = x̂0 (k-diffusion convention: x_t = x0 + σ·ε, the
network sees x_t scaled by c_in). DreamBooth and the diffusers trainers regress the network's raw
output on its own target: ε for eps models, v for v-prediction models. `raw_prediction` undoes
ComfyUI's `calculate_denoised` and `prediction_target` gives the matching target, so

    L = MSE(target(x, ε, σ), raw(D(x_t, c))) + λ · MSE(target(x_pr, ε', σ'), raw(D(x'_t, c_pr)))

with c = "a [V] class", c_pr = "a class" and x_pr images of the class sampled from the frozen
model. Pure torch: no comfy import.

Shapes: latents, noise and predictions [B, C, H, W]; sigma [B].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS: tuple[Prediction, ...] = ("eps", "v", "x0")


def _col(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1)).to(like.dtype)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward process in ComfyUI's convention for eps/v/x0 UNets: x_t = x0 + σ·ε."""
    return x0 + _col(sigma, x0) * noise


def prediction_target(kind: Prediction, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                      sigma_data: float = 1.0) -> torch.Tensor:
    """The raw network output that would denoise x_t = x0 + σε exactly.

    eps: ε. v (Salimans & Ho 2022, in σ units): (σ_d²·ε − σ·x0) / (σ_d·√(σ² + σ_d²)), which is
    √ᾱ·ε − √(1−ᾱ)·x0 for σ_d = 1 and ᾱ = 1/(1+σ²). x0: x0.
    """
    if kind == "eps":
        return noise
    if kind == "v":
        s = _col(sigma, x0)
        return (sigma_data**2 * noise - s * x0) / (sigma_data * (s**2 + sigma_data**2).sqrt())
    if kind == "x0":
        return x0
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTIONS}")


def raw_prediction(kind: Prediction, denoised: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
                   sigma_data: float = 1.0) -> torch.Tensor:
    """The network's raw output recovered from ComfyUI's denoised estimate (inverse of
    `calculate_denoised`): eps (x_t − D)/σ; v (x_t·σ_d²/(σ²+σ_d²) − D)·√(σ²+σ_d²)/(σ·σ_d); x0 D."""
    s = _col(sigma, x_t)
    if kind == "eps":
        return (x_t - denoised) / s
    if kind == "v":
        total = s**2 + sigma_data**2
        return (x_t * sigma_data**2 / total - denoised) * total.sqrt() / (s * sigma_data)
    if kind == "x0":
        return denoised
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTIONS}")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, reduced in fp32 whatever the model's dtype."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


@dataclass(frozen=True)
class StepLoss:
    """One training step's losses as floats: total = subject + prior_weight · prior."""
    subject: float
    prior: float
    prior_weight: float

    @property
    def total(self) -> float:
        return self.subject + self.prior_weight * self.prior


def dreambooth_loss(subject_pred: torch.Tensor, subject_target: torch.Tensor,
                    prior_pred: torch.Tensor | None = None, prior_target: torch.Tensor | None = None,
                    prior_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2): MSE(subject) + λ·MSE(prior).

    Returns (total, subject term, prior term); without a prior batch the prior term is 0 and the
    total is the subject term alone, as it is for λ = 0.
    """
    subject = diffusion_loss(subject_pred, subject_target)
    if prior_pred is None:
        prior = torch.zeros((), device=subject.device)
        return subject, subject, prior
    prior = diffusion_loss(prior_pred, prior_target)
    return subject + prior_weight * prior, subject, prior
