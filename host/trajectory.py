"""The trajectory of an inversion and the reference latent it supplies at each sampling step (pure torch).

Sampling order throughout: index 0 is the noisiest state (the inverted latent, the official
code's z_T = zts[0]) and the last index the input latent at sigma 0, so index j is the state at
the start of sampling step j when the same sigmas are sampled forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InversionTrajectory:
    """x at every sigma of an inversion, in the LATENT space of ComfyUI's `samples` (outer space).

    sigmas  [S+1]              descending, sigmas[-1] = 0 (the schedule sampled forward)
    latents [S+1, B, C, H, W]  latents[j] is x at sigmas[j]; latents[0] the inverted latent,
                               latents[-1] the input latent
    cfg     the guidance scale the inversion ran with
    """
    sigmas: torch.Tensor
    latents: torch.Tensor
    cfg: float

    def __post_init__(self):
        if self.latents.shape[0] != self.sigmas.shape[0]:
            raise ValueError(f"{self.latents.shape[0]} latents for {self.sigmas.shape[0]} sigmas")

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def inverted(self) -> torch.Tensor:
        return self.latents[0]


def pinned_index(step: int, offset: int, steps: int) -> int:
    """Trajectory index of the reference row at sampling step `step` (official StyleAligned rule).

    The official inversion callback starts the reference at zts[offset] and, after every step i,
    sets it to zts[max(offset + 1, i + 1)]: it stays pinned to zts[offset + 1] for the first steps
    and follows the trajectory afterwards. offset 0 replays the trajectory step by step.
    """
    index = offset if step == 0 else max(offset + 1, step)
    return min(index, steps)


def step_position(sigmas: torch.Tensor, sigma: float, rtol: float = 1e-4) -> tuple[int, float]:
    """(j, w): `sigma` lies a fraction w of the way from sigmas[j] to sigmas[j+1] (descending sigmas).

    A sigma equal to sigmas[j] (within rtol) gives (j, 0); multistage samplers evaluate between
    schedule points, which gives 0 < w < 1. Above the schedule clamps to (0, 0), zero to the end.
    """
    values = [float(s) for s in sigmas]
    last = len(values) - 1
    for j, s in enumerate(values):
        if abs(sigma - s) <= rtol * max(abs(s), 1e-3):
            return j, 0.0
    if sigma > values[0]:
        return 0, 0.0
    for j in range(last):
        hi, lo = values[j], values[j + 1]
        if hi > sigma > lo:
            return j, (hi - sigma) / (hi - lo)
    return last, 0.0


def level_scale(sigma_from: float, sigma_to: float) -> float:
    """Factor that moves x held at sigma_from to sigma_to keeping the model's input, the DDIM latent.

    ComfyUI's ε/v models see x/√(1+σ²) = z; a latent of one level evaluated at another (the
    official inversion's z_{t−1} at timestep t, a pinned reference row) keeps its z when x is
    multiplied by √(1+σ_to²)/√(1+σ_from²)."""
    return ((1.0 + sigma_to ** 2) / (1.0 + sigma_from ** 2)) ** 0.5


def reference_latent(trajectory_latents: torch.Tensor, sigmas: torch.Tensor, sigma: float, offset: int) -> torch.Tensor:
    """The reference row's latent when the sampler evaluates the model at `sigma`.

    The official code feeds the UNet the DDIM latent zts[k] as it is, whatever the timestep: while
    pinned (steps 0..offset) zts[offset] / zts[offset + 1] at the current timestep. So the state's
    DDIM latent z_k = x_k/√(1+σ_k²) is held and returned as x at `sigma` (level_scale), and the
    model's input is exactly the official latent. Between schedule points of a free step
    (multistage samplers) the trajectory is interpolated linearly in sigma (an Euler/DDIM step is
    linear in sigma, so this is the inversion's own path). Shapes: latents [S+1, B, ...], sigmas
    [S+1] -> [B, ...].
    """
    steps = sigmas.shape[0] - 1
    j, w = step_position(sigmas, sigma)
    index = pinned_index(j, offset, steps)
    if index == j and j < steps and w != 0.0:
        return torch.lerp(trajectory_latents[j], trajectory_latents[j + 1], w)
    return trajectory_latents[index] * level_scale(float(sigmas[index]), float(sigma))
