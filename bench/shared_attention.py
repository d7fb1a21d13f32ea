"""StyleAligned, Visual Style Prompting and DDIM inversion against plain sampling (SD1.5, 512 px)."""
from __future__ import annotations

import math

import torch

from stylekit.host.layer_select import ALL, VSP_DEFAULT, resolve_blocks
from stylekit.patching.style_aligned import StyleAlignedSettings, install_style_aligned
from stylekit.patching.visual_style import VisualStyleSettings, install_visual_style_prompting

from .harness import Case


def style_aligned(model, clip, vae, **overrides):
    values = dict(blocks=resolve_blocks(model, ALL), share_group_norm=True)
    values.update(overrides)
    return install_style_aligned(model, StyleAlignedSettings(**values))


def visual_style_prompting(model, clip, vae):
    return install_visual_style_prompting(model, VisualStyleSettings(blocks=resolve_blocks(model, VSP_DEFAULT)))


class InversionVersusSampling:
    """Times one DDIM inversion step against one plain sampling step (same cfg, same batch): the
    patched 'model' is a marked clone, and the timed call inverts with it and samples otherwise."""

    def __init__(self, side: int = 512, steps: int = 2):
        self.side, self.steps = side, steps
        self.inverting = None
        self.conds = None

    def patch(self, model, clip, vae):
        import nodes

        encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]
        self.conds = encode("a lighthouse"), encode("")
        self.inverting = model.clone()
        return self.inverting

    def run(self, model) -> None:
        import comfy.sample

        from stylekit.sampling.inversion import invert, schedule

        latent = torch.randn(1, 4, self.side // 8, self.side // 8, generator=torch.Generator().manual_seed(0))
        if model is self.inverting:
            invert(model, latent, *self.conds, schedule(model, "normal", self.steps), cfg=5.0, progress=False)
        else:
            noise = comfy.sample.prepare_noise(latent, 0)
            comfy.sample.sample(model, noise, self.steps, 5.0, "euler", "normal", *self.conds, latent,
                                disable_pbar=True, seed=0)


_inversion = InversionVersusSampling()

CASES = [
    Case("StyleAligned batch 2", "sd15", style_aligned, batch=2, goal=1.6, memory_clones=10,
         notes="all 16 attn1 layers, AdaIN q/k, shared GroupNorm"),
    Case("StyleAligned batch 4", "sd15", style_aligned, batch=4),
    Case("StyleAligned batch 2, real-reference settings", "sd15",
         lambda model, clip, vae: style_aligned(model, clip, vae, shared_score_shift=math.log(2)), batch=2,
         notes="shared_score_shift ln 2 (attention bias)"),
    Case("Visual Style Prompting batch 2", "sd15", visual_style_prompting, batch=2),
    Case("StyleAligned batch 2", "sdxl", style_aligned, batch=2, side=1024, steps=1),
    Case("Visual Style Prompting batch 2", "sdxl", visual_style_prompting, batch=2, side=1024, steps=1),
    Case("DDIM inversion per step", "sd15", _inversion.patch, batch=1, run=_inversion.run,
         notes="one inversion step vs one sampling step, cfg 5"),
]
