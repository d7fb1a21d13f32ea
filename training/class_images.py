"""DreamBooth's class images: samples of "a [class noun]" from the frozen model (Ruiz et al. 2023 §3.3).

Sampled in mini-batches so a few hundred images fit in memory; image k always gets the noise of
index k under the seed (core's `noise_inds`), so the set does not depend on the mini-batch size.
"""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.utils
import torch


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING of `text`, as core's CLIPTextEncode gives it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_class_images(model, clip, vae, prompt: str, count: int, width: int, height: int, steps: int,
                        cfg: float, sampler_name: str, scheduler: str, seed: int, batch_size: int) -> torch.Tensor:
    """IMAGE [count, height, width, 3] of `prompt` (negative: empty prompt) from `model`."""
    positive, negative = encode_prompt(clip, prompt), encode_prompt(clip, "")
    ratio = vae.spacial_compression_encode()
    progress = comfy.utils.ProgressBar(count)
    images = None  # filled in place: concatenating mini-batches would hold the set twice
    for start in range(0, count, batch_size):
        comfy.model_management.throw_exception_if_processing_interrupted()
        indices = list(range(start, min(count, start + batch_size)))
        latent = torch.zeros(len(indices), 4, height // ratio, width // ratio)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed, indices)
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                      latent, disable_pbar=True, seed=seed)
        decoded = vae.decode(samples)[..., :3].cpu()
        if images is None:
            images = torch.empty((count, *decoded.shape[1:]), dtype=decoded.dtype)
        images[indices[0]:indices[-1] + 1] = decoded
        progress.update_absolute(indices[-1] + 1)
    return images
