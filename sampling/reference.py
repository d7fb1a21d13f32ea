"""Sampling with a reference row: row 0 of the batch is re-supplied at every model evaluation.

The real-reference variants of StyleAligned and Visual Style Prompting sample a batch
[reference, generated rows...] where the reference row is not generated but given at each step:
from an inversion trajectory (StyleAligned, pinned for the first `offset` steps) or as the
reference latent forward-noised to the step's sigma (VSP's real-image script). The shared or
swapped attention installed on the model then reads the reference's features from that row.
Done in a CFGGuider, so it holds for every sampler and for cond/uncond batched or split.
"""
from __future__ import annotations

from typing import Callable

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..attention.adain import match_channel_stats
from ..host.schedule import SigmaWindow
from .conditioning import InputError, with_reference_row
from ..host.trajectory import InversionTrajectory, reference_latent, step_position

ReferenceAt = Callable[[float], torch.Tensor]


class TrajectoryReference:
    """The reference row replays an inversion trajectory (official StyleAligned real reference)."""

    def __init__(self, trajectory: InversionTrajectory, offset: int = 5):
        if trajectory.latents.shape[1] != 1:
            raise ValueError(f"the trajectory holds {trajectory.latents.shape[1]} images; invert a single "
                             "reference image")
        self.trajectory = trajectory
        self.offset = offset
        self.shape = tuple(trajectory.latents.shape[1:])

    def bind(self, process_in: Callable, sigmas: torch.Tensor) -> ReferenceAt:
        latents = torch.stack([process_in(x) for x in self.trajectory.latents])
        return lambda sigma: reference_latent(latents, self.trajectory.sigmas, sigma, self.offset)


class NoisedReference:
    """The reference row is z0 + σ·ε at each step, fresh ε per step (official VSP real image); on a
    rectified flow (flow=True: Flux, SD3/3.5) the flow's own noising (1 − σ)·z0 + σ·ε."""

    def __init__(self, latent: torch.Tensor, seed: int, flow: bool = False):
        if latent.shape[0] != 1:
            raise ValueError(f"the reference latent holds {latent.shape[0]} images; encode a single reference image")
        self.latent = latent
        self.seed = seed
        self.flow = flow
        self.shape = tuple(latent.shape)

    def bind(self, process_in: Callable, sigmas: torch.Tensor) -> ReferenceAt:
        z0 = process_in(self.latent.float())

        def at(sigma: float) -> torch.Tensor:
            step, _ = step_position(sigmas, sigma)
            generator = torch.Generator().manual_seed((self.seed + 1 + step) % 2**64)  # seeds reach 2^64 - 1
            noise = sigma * torch.randn(z0.shape, generator=generator)
            return (1.0 - sigma) * z0 + noise if self.flow else z0 + noise
        return at


# Samplers whose step from σ to the next schedule sigma is the DDIM step x' = x0 + σ'·ε (core's
# "ddim" is its Euler sampler): for them the colour calibration is exactly the official one.
DDIM_STEP_SAMPLERS = ("euler", "ddim")


def calibrated_denoised(x: torch.Tensor, denoised: torch.Tensor, calibrated: torch.Tensor, sigma: float,
                        sigma_next: float) -> torch.Tensor:
    """The denoised output whose Euler/DDIM step from sigma to sigma_next lands on the official
    calibrated DDIM step: x' = x0_cal + σ'·ε with the predicted noise ε = (x − D)/σ kept.

    An Euler step gives x' = D' + (σ'/σ)(x − D'); solving for D' with r = σ'/σ:
    D' = (x0_cal − r·D)/(1 − r). Replacing D by x0_cal alone would move the sample by (1 − r) of
    the official correction."""
    r = sigma_next / sigma
    return (calibrated - r * denoised) / (1.0 - r)


def calibrated_denoised_flow(x: torch.Tensor, denoised: torch.Tensor, calibrated: torch.Tensor, sigma: float,
                             sigma_next: float) -> torch.Tensor:
    """calibrated_denoised on a rectified flow (x = (1 − σ)·x0 + σ·ε): the denoised output whose Euler
    step lands on x' = (1 − σ')·x0_cal + σ'·ε, ε = (x − (1 − σ)·D)/σ the predicted noise kept.

    The Euler step is x' = r·x + (1 − r)·D' with r = σ'/σ, so D' = ((1 − σ')·x0_cal − r(1 − σ)·D)/(1 − r)
    (D' = D when x0_cal = D)."""
    r = sigma_next / sigma
    return ((1.0 - sigma_next) * calibrated - r * (1.0 - sigma) * denoised) / (1.0 - r)


class ReferenceRowGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose batch row 0 is the reference; optional VSP colour calibration and a
    conditional-only prediction for the reference row (official VSP real-image script)."""

    def __init__(self, model_patcher, source, colour_window: SigmaWindow | None = None,
                 cond_only_reference: bool = False, ddim_step: bool = True):
        super().__init__(model_patcher)
        self.source = source
        self.colour_window = colour_window
        self.cond_only_reference = cond_only_reference
        self.ddim_step = ddim_step            # the sampler steps as DDIM: calibrate as the official step
        self.flow = isinstance(model_patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)
        self._reference_at: ReferenceAt | None = None
        self._sigmas: torch.Tensor | None = None

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self._reference_at = self.source.bind(self.model_patcher.model.process_latent_in, sigmas.cpu())
        self._sigmas = sigmas.cpu()
        try:
            return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self._reference_at = None

    def _next_sigma(self, sigma: float) -> float | None:
        """The schedule's next sigma when `sigma` is a schedule point, else None."""
        if self._sigmas is None:
            return None
        j, w = step_position(self._sigmas, sigma)
        return float(self._sigmas[j + 1]) if w == 0.0 and j + 1 < self._sigmas.shape[0] else None

    def _post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if self.cond_only_reference and args.get("cond_denoised") is not None:
            denoised = denoised.clone()
            denoised[:1] = args["cond_denoised"][:1]
        sigma = float(args["sigma"].flatten()[0])
        if self.colour_window is not None and self.colour_window.contains(sigma):
            # Official (VSP scheduling_ddim.py): the predicted x0 of every image gets the reference
            # row's channel statistics and the step keeps the predicted noise.
            calibrated = denoised.clone()
            calibrated[1:] = match_channel_stats(denoised[1:], denoised[:1])
            sigma_next = self._next_sigma(sigma)
            if self.ddim_step and sigma_next is not None and args.get("input") is not None:
                step = calibrated_denoised_flow if self.flow else calibrated_denoised
                calibrated[1:] = step(args["input"][1:], denoised[1:], calibrated[1:], sigma, sigma_next)
            denoised = calibrated
        return denoised

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.flatten()[0])
        x = x.clone()
        x[:1] = self._reference_at(sigma).to(x)
        if self.colour_window is not None or self.cond_only_reference:
            model_options = dict(model_options)
            model_options["sampler_post_cfg_function"] = (
                list(model_options.get("sampler_post_cfg_function", [])) + [self._post_cfg])
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), self.cfg,
                                                model_options=model_options, seed=seed)


def sample_with_reference(model_patcher, source, positive, negative, reference_positive,
                          latent_image: torch.Tensor, sigmas: torch.Tensor, seed: int, cfg: float,
                          sampler_name: str, colour_window: SigmaWindow | None = None,
                          cond_only_reference: bool = False) -> torch.Tensor:
    """Sample `latent_image` ([B, C, H, W]) as rows 1..B of a batch whose row 0 is `source`'s
    reference; returns the B generated rows. Row i gets the same initial noise KSampler would give
    it for this seed, so a row differs from plain sampling only by what it shares."""
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent_image)
    if tuple(latent_image.shape[1:]) != source.shape[1:]:
        raise InputError("latent_image", f"its latent is {tuple(latent_image.shape[1:])} (channels, height, width) "
                         f"but the reference's is {source.shape[1:]}; generate at the reference's size")
    batch = latent_image.shape[0]
    rows = torch.cat([torch.zeros_like(latent_image[:1]), latent_image])
    noise = torch.cat([torch.zeros_like(latent_image[:1]), comfy.sample.prepare_noise(latent_image, seed)])
    guider = ReferenceRowGuider(model_patcher, source, colour_window, cond_only_reference,
                                ddim_step=sampler_name in DDIM_STEP_SAMPLERS)
    guider.set_conds(with_reference_row(reference_positive, positive, batch), negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model_patcher, sigmas.shape[-1] - 1)
    samples = guider.sample(noise, rows, comfy.samplers.sampler_object(sampler_name), sigmas,
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return samples[1:].to(comfy.model_management.intermediate_device())
