"""Helpers shared by the training tests: subject images, an independent denoising loss."""
from __future__ import annotations

import numpy as np
import torch

from stylekit.tests.fixtures.images import SUBJECT_IMAGES, subject_image

EVAL_TIMESTEPS = (50, 200, 400, 600, 800, 950)


def subject_images(side: int = 64) -> torch.Tensor:
    """IMAGE [3, side, side, 3]: the example subject, as LoadImage + ImageScale would give it."""
    return torch.stack([torch.from_numpy(np.asarray(subject_image(v).resize((side, side)), dtype=np.float32) / 255)
                        for v in range(len(SUBJECT_IMAGES))])


def eps_denoising_loss(model_patcher, latents: torch.Tensor, conditioning: list, seed: int = 1234) -> float:
    """Mean ‖ε − ε̂‖² of an SD1.5 (eps) model on VAE latents at fixed noise and timesteps, computed
    through core's apply_model directly (not through the trainer's code path): x_t = x0 + σε,
    ε̂ = (x_t − D(x_t)) / σ."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher])
    base = model_patcher.model
    x0 = base.process_latent_in(latents.float())
    context = conditioning[0][0].repeat(x0.shape[0], 1, 1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(x0.shape, generator=generator)
        sigma = base.model_sampling.sigma(torch.full((x0.shape[0],), float(t)))
        s = sigma.view(-1, 1, 1, 1)
        x_t = x0 + s * noise
        denoised = base.apply_model(x_t, sigma, c_crossattn=context)
        losses.append((((x_t - denoised) / s - noise) ** 2).mean().item())
    return float(np.mean(losses))


def sample(model_patcher, clip, text: str = "a lighthouse", seed: int = 7) -> torch.Tensor:
    """A 2-step 8x8 latent sample through core's KSampler path."""
    import nodes

    (positive,) = nodes.CLIPTextEncode().encode(clip, text)
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model_patcher, seed, 2, 4.0, "euler", "normal", positive, negative, latent)[0]["samples"]
