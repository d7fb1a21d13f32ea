"""Deterministic DDIM inversion on core sampling, reusable by any method that needs it.

The official loop (google/style-aligned `inversion.py`: `_ddim_loop` + `_next_step`, the
null-text inversion recipe) works on DDIM latents z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε. It starts from z0
at the level of ᾱ_0 (timestep 0, the scheduler's `final_alpha_cumprod` with set_alpha_to_one
False) and at every step evaluates the UNet on the current latent z_{t−1} at the *next* timestep
t, then moves z_{t−1} to level t with that noise: z_t = √ᾱ_t·x̂0 + √(1−ᾱ_t)·ε, x̂0 =
(z_{t−1} − √(1−ᾱ_{t−1})·ε)/√ᾱ_{t−1}.

In ComfyUI's sigma parameterisation (x = z/√ᾱ, σ = √((1−ᾱ)/ᾱ), the model's input is
x/√(1+σ²) = z) the same step reads x' = x + ε·(σ' − σ). The UNet must see z_{t−1} at σ', so the
model is called on x·√(1+σ'²)/√(1+σ²) at σ' (its input scaling then gives back exactly z_{t−1}),
and the first step starts from x = z0·√(1+σ_min²) at σ_min, the level of ᾱ_0. That is the
official algorithm step for step (tests/host/test_inversion.py re-implements the official loop on
a diffusers twin of the UNet and compares). It runs through core's CFGGuider and KSAMPLER with the
schedule reversed, so conditioning, CFG, model patches, wrappers and the progress bar work as in
any sampling.

    trajectory = invert(model, latent, positive, negative, sigmas, cfg=2.0)
    trajectory.inverted          # the inverted latent (sample forward from it with no added noise)
    trajectory.latents[j]        # x at trajectory.sigmas[j], sampling order

`method="renoise"` runs ReNoise inversion instead (sampling/renoise.py), as InstantStyle-Plus does.
"""
from __future__ import annotations

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..host.gradients import autograd_enabled
from ..host.trajectory import InversionTrajectory, level_scale
from .renoise import ReNoiseSettings, renoise_step

DDIM, RENOISE = "ddim", "renoise"
METHODS = (DDIM, RENOISE)


def inverse_euler_step(model, x, x_in, sigma, sigma_next, s_in, extra_args: dict, iterations: int):
    """One inverse Euler step from sigma up to sigma_next: x' = x + (x_in − D(x_in, σ'))/σ'·(σ' − σ),
    the model evaluated at the destination level on x_in (x itself, or x as the model must see it);
    then `iterations` fixed-point refinements re-evaluate it at the current estimate of x' (the exact
    inverse of a forward Euler step). Returns (x', the last denoised prediction)."""
    denoised = model(x_in, sigma_next * s_in, **extra_args)
    x_next = x + (x_in - denoised) / sigma_next * (sigma_next - sigma)
    for _ in range(iterations):
        denoised = model(x_next, sigma_next * s_in, **extra_args)
        x_next = x + (x_next - denoised) / sigma_next * (sigma_next - sigma)
    return x_next, denoised


@torch.no_grad()
def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                          fixed_point_iterations: int = 0, sigma_start: float = 0.0):
    """DDIM inversion as a k-diffusion sampler over ascending sigmas; appends every x to `trajectory`.

    sigmas[0] is 0 (the input latent x = z0); the official loop treats z0 as the latent at
    `sigma_start` (σ_min, the level of ᾱ_0), so the first step starts there. Each step is
    x' = x + ε·(σ' − σ) with ε = ε(z, σ'), z = x/√(1+σ²) the current DDIM latent (the model is
    called on x scaled by level_scale(σ, σ')). `fixed_point_iterations` re-evaluate ε at the
    current estimate of x' (the implicit step that exactly undoes a forward DDIM step; one model
    call each).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if trajectory is not None:
        trajectory.append(x.cpu())  # off the device as stored: up to steps x latent, untracked by core
    x = x * level_scale(0.0, float(sigma_start))
    for i in range(len(sigmas) - 1):
        sigma = float(sigma_start) if i == 0 else float(sigmas[i])
        sigma_next = float(sigmas[i + 1])
        x_next, denoised = inverse_euler_step(model, x, x * level_scale(sigma, sigma_next), sigma, sigma_next,
                                              s_in, extra_args, fixed_point_iterations)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_next, "sigma_hat": sigma_next, "denoised": denoised})
        x = x_next
        if trajectory is not None:
            trajectory.append(x.cpu())
    return x


@torch.no_grad()
def sample_renoise_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                             sigma_start: float = 0.0, first_range_sigma: float = 0.0, seed: int = 0,
                             settings: ReNoiseSettings = ReNoiseSettings()):
    """ReNoise inversion (sampling/renoise.py) as a k-diffusion sampler over ascending sigmas.

    Works on DDIM latents z = x/√(1+σ²), from z0 at the level of ᾱ_0 as the DDIM loop; the model
    is called so that the UNet sees z at the destination level's timestep. One generator, seeded
    with `seed`, draws the forward noise first and then every random roll of the regulariser."""
    extra_args = {} if extra_args is None else extra_args
    if trajectory is not None:
        trajectory.append(x.cpu())  # off the device as stored
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=generator).to(x)
    z0 = z = x
    for i in range(len(sigmas) - 1):
        sigma = float(sigma_start) if i == 0 else float(sigmas[i])
        sigma_next = float(sigmas[i + 1])
        alpha, alpha_next = 1.0 / (1.0 + sigma ** 2), 1.0 / (1.0 + sigma_next ** 2)

        def eps(latents, sigma_next=sigma_next):
            x_in = latents * (1.0 + sigma_next ** 2) ** 0.5
            denoised = model(x_in, sigma_next * x_in.new_ones([x_in.shape[0]]), **extra_args)
            return (x_in - denoised) / sigma_next

        z_forward = alpha_next ** 0.5 * z0 + (1 - alpha_next) ** 0.5 * noise
        z = renoise_step(eps, z, z_forward, alpha, alpha_next, sigma_next < first_range_sigma, settings,
                         generator, autograd_enabled)
        x = z * (1.0 + sigma_next ** 2) ** 0.5
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_next, "sigma_hat": sigma_next, "denoised": x})
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
           progress: bool = True, method: str = DDIM) -> InversionTrajectory:
    """Invert `latent_image` (LATENT samples, [B, C, H, W]) along the descending `sigmas`.

    positive / negative are CONDITIONING lists (the official code inverts with the image's
    caption and an all-zero negative: ConditioningZeroOut). Returns the trajectory in sampling
    order; its `inverted` latent sampled forward with the same model, prompt, cfg and sigmas
    reconstructs the input up to DDIM inversion's discretisation error, which
    `fixed_point_iterations` (extra model calls per step) reduce; 0 is plain DDIM inversion.
    method "renoise" runs ReNoise inversion with InstantStyle-Plus's settings instead (its
    official run uses no guidance: cfg 1 here); `seed` seeds its forward noise and rolls.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    check_invertible(model_patcher)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2 or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas must be a full descending schedule ending at 0")
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent_image)
    ascending = sigmas.flip(0)
    states: list[torch.Tensor] = []
    # The official loop starts from z0 at the level of ᾱ_0: timestep 0's sigma, σ_min.
    model_sampling = model_patcher.get_model_object("model_sampling")
    sigma_start = float(model_sampling.sigma_min)
    if method == RENOISE:
        first_range_sigma = float(model_sampling.sigma(torch.tensor(float(ReNoiseSettings.first_range_timestep))))
        sampler = comfy.samplers.KSAMPLER(sample_renoise_inversion, extra_options={
            "trajectory": states, "sigma_start": sigma_start, "first_range_sigma": first_range_sigma, "seed": seed})
    else:
        sampler = comfy.samplers.KSAMPLER(sample_ddim_inversion, extra_options={
            "trajectory": states, "fixed_point_iterations": fixed_point_iterations, "sigma_start": sigma_start})
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
