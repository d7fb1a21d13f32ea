"""Style-loss guidance against plain sampling: SD1.5 at 512 px, TAESD and the full KL VAE decoder,
every step and every third step; time ratio and peak memory of one run each. The discriminator is
CSD at its real size (ViT-L/14, 304 M parameters, random weights in the official layout): its
forward and backward pass at 224 px is part of every guided step's cost."""
from __future__ import annotations

import torch

from stylekit.sampling.style_guidance import (EXACT, FAST, TAESD_DECODER, VAE_DECODER, StyleGuidanceSettings,
                                              apply_style_guidance)
from stylekit.style_discriminator.files import StyleDiscriminator, csd_state_dict
from stylekit.tests.fixtures.random_weights import random_state_dict
from stylekit.tests.fixtures.registry import SD_VAE
from stylekit.tests.fixtures.style_discriminators import official_layout_shapes

from .harness import Case


def _style_image() -> torch.Tensor:
    return torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))


_REAL_SIZE: list[StyleDiscriminator] = []


def real_size_csd() -> StyleDiscriminator:
    """CSD ViT-L/14 (width 1024, 24 layers) with seeded random weights, read through the loader's
    own conversion of the official layout; built once per bench run."""
    if not _REAL_SIZE:
        raw = {"module." + k: v for k, v in random_state_dict(official_layout_shapes(1024, 24), 0).items()}
        config, sd = csd_state_dict(raw)
        _REAL_SIZE.append(StyleDiscriminator("csd_vit-l (random weights, real size)", config, sd))
    return _REAL_SIZE[0]


def guided(every: int, decoder: str, mode: str = FAST):
    def patch(model, clip, vae):
        import nodes

        full_vae = nodes.VAELoader().load_vae(SD_VAE.filename)[0] if decoder == VAE_DECODER else None
        settings = StyleGuidanceSettings(scale=100.0, every=every, decoder=decoder, mode=mode)
        return apply_style_guidance(model, real_size_csd(), _style_image(),
                                    settings, vae=full_vae)
    return patch


CASES = [
    Case("Style guidance every step, TAESD", "sd15", guided(1, TAESD_DECODER), steps=3, peak_memory=True,
         notes="CSD ViT-L/14 real size (random weights), cfg 5"),
    Case("Style guidance every 3 steps, TAESD", "sd15", guided(3, TAESD_DECODER), steps=3, goal=1.5,
         peak_memory=True, notes="3 steps: step 0 guided, as 1 in 3 of any schedule"),
    Case("Style guidance every step, full VAE", "sd15", guided(1, VAE_DECODER), steps=3, peak_memory=True,
         notes="vae-ft-mse-840000 layout, fp32"),
    Case("Style guidance every 3 steps, full VAE", "sd15", guided(3, VAE_DECODER), steps=3, peak_memory=True),
    Case("Style guidance every 3 steps, TAESD, exact", "sd15", guided(3, TAESD_DECODER, EXACT), steps=3,
         peak_memory=True, notes="exact (the default mode): one more UNet forward and backward per guided step"),
]
