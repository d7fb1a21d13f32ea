"""Deterministic DDIM-style inversion on core sampling, reusable by any method that needs it.

In ComfyUI's sigma parameterisation (x = z/√ᾱ, σ = √((1−ᾱ)/ᾱ)) a DDIM step is the Euler step of
the probability-flow ODE, x' = x + ε·(σ' − σ) with ε = (x − D(x, σ))/σ. DDIM inversion takes the
same step towards higher sigma with ε evaluated on the current latent at the destination noise
level, ε(z_{t−1}, t), exactly as the official StyleAligned / null-text inversion code does; the
step starting at sigma 0 therefore needs no evaluation at sigma 0. It runs through core's
CFGGuider and KSAMPLER with the schedule reversed, so conditioning, CFG, model patches, wrappers
and the progress bar work as in any sampling.

    trajectory = invert(model, latent, positive, negative, sigmas, cfg=2.0)
    trajectory.inverted          # the inverted latent (sample forward from it with no added noise)
    trajectory.latents[j]        # x at trajectory.sigmas[j], sampling order
"""
from __future__ import annotations

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from .trajectory import InversionTrajectory


@torch.no_grad()
def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                          fixed_point_iterations: int = 0):
    """DDIM inversion as a k-diffusion sampler over ascending sigmas; appends every x to `trajectory`.

    Each step is x' = x + ε·(σ' − σ). Plain DDIM inversion takes ε = ε(x, σ'); the step that
    exactly undoes a forward Euler/DDIM step needs ε(x', σ'), which `fixed_point_iterations`
    approach by re-evaluating at the current estimate of x' (one model call each; ReNoise-style
    refinement without its averaging).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if trajectory is not None:
        trajectory.append(x.cpu())  # off the device as stored: up to steps x latent, untracked by core
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_next * s_in, **extra_args)
        x_next = x + (x - denoised) / sigma_next * (sigma_next - sigma)
        for _ in range(fixed_point_iterations):
            denoised = model(x_next, sigma_next * s_in, **extra_args)
            x_next = x + (x_next - denoised) / sigma_next * (sigma_next - sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_next, "sigma_hat": sigma_next, "denoised": denoised})
        x = x_next
        if trajectory is not None:
            trajectory.append(x.cpu())
    return x


def check_invertible(model_patcher) -> None:
    """Inversion is defined here for the ε/v-prediction family (x = z0 + σ·noise), SD1.x-SDXL."""
    sampling = model_patcher.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise ValueError(f"inversion supports ε- and v-prediction models (SD1.x, SD2.x, SDXL); this model "
                         f"samples with {type(sampling).__name__}")


def schedule(model_patcher, scheduler: str, steps: int) -> torch.Tensor:
    """Descending sigmas of a core scheduler, as KSampler would sample them."""
    sampling = model_patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu()


def invert(model_patcher, latent_image: torch.Tensor, positive, negative, sigmas: torch.Tensor,
           cfg: float = 2.0, fixed_point_iterations: int = 0, seed: int = 0,
           progress: bool = True) -> InversionTrajectory:
    """Invert `latent_image` (LATENT samples, [B, C, H, W]) along the descending `sigmas`.

    positive / negative are CONDITIONING lists (the official code inverts with the image's
    caption and an all-zero negative: ConditioningZeroOut). Returns the trajectory in sampling
    order; its `inverted` latent sampled forward with the same model, prompt, cfg and sigmas
    reconstructs the input up to DDIM inversion's discretisation error, which
    `fixed_point_iterations` (extra model calls per step) reduce; 0 is plain DDIM inversion.
    """
    check_invertible(model_patcher)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas must be a full descending schedule ending at 0")
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent_image)
    ascending = sigmas.flip(0)
    states: list[torch.Tensor] = []
    sampler = comfy.samplers.KSAMPLER(sample_ddim_inversion, extra_options={
        "trajectory": states, "fixed_point_iterations": fixed_point_iterations})
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    bar = comfy.utils.ProgressBar(ascending.shape[0] - 1) if progress else None
    callback = None if bar is None else (lambda i, denoised, x, total: bar.update_absolute(i + 1, total))
    guider.sample(torch.zeros_like(latent_image), latent_image, sampler, ascending, callback=callback,
                  disable_pbar=True, seed=seed)
    process_out = model_patcher.model.process_latent_out
    # The last state is the input itself: keep it bit-exact rather than scaled in and out again.
    latents = torch.stack([process_out(x.float()).cpu() for x in reversed(states[1:])] + [latent_image.float().cpu()])
    return InversionTrajectory(sigmas=sigmas.float().cpu(), latents=latents, cfg=float(cfg))
