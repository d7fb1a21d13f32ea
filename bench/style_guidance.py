"""Style-loss guidance against plain sampling: SD1.5 at 512 px, TAESD and the full KL VAE decoder,
every step and every third step; time ratio and peak memory of one run each."""
from __future__ import annotations

import torch

from stylekit.sampling.style_guidance import TAESD_DECODER, VAE_DECODER, StyleGuidanceSettings, apply_style_guidance
from stylekit.style_discriminator.files import load_style_discriminator
from stylekit.tests.fixtures.registry import CSD_CHECKPOINT, SD_VAE

from .harness import Case


def _style_image() -> torch.Tensor:
    return torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))


def guided(every: int, decoder: str):
    def patch(model, clip, vae):
        import nodes

        full_vae = nodes.VAELoader().load_vae(SD_VAE.filename)[0] if decoder == VAE_DECODER else None
        settings = StyleGuidanceSettings(scale=100.0, every=every, decoder=decoder)
        return apply_style_guidance(model, load_style_discriminator(CSD_CHECKPOINT.filename), _style_image(),
                                    settings, vae=full_vae)
    return patch


CASES = [
    Case("Style guidance every step, TAESD", "sd15", guided(1, TAESD_DECODER), steps=3, peak_memory=True,
         notes="fast mode, CSD fixture (tiny ViT), cfg 5"),
    Case("Style guidance every 3 steps, TAESD", "sd15", guided(3, TAESD_DECODER), steps=3, goal=1.5,
         peak_memory=True, notes="3 steps: step 0 guided, as 1 in 3 of any schedule"),
    Case("Style guidance every step, full VAE", "sd15", guided(1, VAE_DECODER), steps=3, peak_memory=True,
         notes="vae-ft-mse-840000 layout, fp32"),
    Case("Style guidance every 3 steps, full VAE", "sd15", guided(3, VAE_DECODER), steps=3, peak_memory=True),
]
