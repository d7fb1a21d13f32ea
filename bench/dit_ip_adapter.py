"""Flux (XLabs) and SD3.5 (InstantX) IP-Adapter cost against plain sampling at 1024 px token counts
(goal: per-step time ratio <= 1.05), and the memory of 10 chained patched clones.

Token counts are the real ones at 1024 px: 4096 image tokens, plus 512 text tokens on Flux (T5 at
diffusers' max_sequence_length) and 154 on SD3.5 (core's 77 CLIP + 77 T5). Width is reduced to fit
a CPU (tiny core models of tests/support/tiny_dits.py at hidden 128, adapters at the same widths in
the real key layouts); block proportions are kept: the Flux model has 2 double + 4 single blocks,
Flux.1's 19 : 38, since the XLabs adapter patches the double blocks only.

What the ratio means differs. XLabs adds a cross-attention of the image queries over 16 tokens
and our recomputed pre-RoPE query (1/12 of a double block's image-stream matmuls): its floor is
~1.0. InstantX attends from the image tokens over all image tokens plus 64 IP tokens in every
joint block (diffusers' SD3IPAdapterJointAttnProcessor2_0), a second image self-attention: the
algorithm itself is far above 1.05, the more so at a reduced width, where attention dominates.
Single-thread CPU times per block (min of 3) at hidden 1024, batch 1, same token counts: Flux
double block +3.9 % (about 1.01 for Flux.1's 19 double + 38 single blocks); SD3.5 joint block
1.39, diffusers' own processor 1.44 on its own block.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from stylekit.dit_adapters.files import dit_adapter_from_state_dict
from stylekit.dit_adapters.xlabs_flux import xlabs_flux_from_state_dict
from stylekit.patching.flux_ip_adapter import FluxIPSettings, apply_flux_ip_adapter, flux_image_tokens
from stylekit.patching.sd35_ip_adapter import SD35IPSettings, apply_sd35_ip_adapter
from stylekit.tests.fixtures.dit_ip_adapters import instantx_sd35_shapes, xlabs_flux_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict
from stylekit.tests.support.tiny_dits import TINY_FLUX, dit_conditioning, tiny_flux, tiny_mmdit

from .harness import Case


@lru_cache(maxsize=None)
def _flux_adapter():
    """Built once: every clone shares the adapter and its tokens, as clones of a loaded file do."""
    file = random_state_dict(xlabs_flux_shapes(16, TINY_FLUX["depth"], TINY_FLUX["hidden_size"], 4096, 768), 0,
                             dtype=torch.float32)
    adapter = xlabs_flux_from_state_dict(file, "flux-ip-adapter-v2 (tiny width)")
    return adapter, flux_image_tokens(adapter, torch.randn(1, 768, generator=torch.Generator().manual_seed(0)))


def _flux(model, clip, vae):
    adapter, tokens = _flux_adapter()
    return apply_flux_ip_adapter(model, adapter, tokens, FluxIPSettings(weight=0.8))


@lru_cache(maxsize=None)
def _sd35_adapter():
    shapes = instantx_sd35_shapes(joint_blocks=2, hidden=128)
    adapter = dit_adapter_from_state_dict({p: random_state_dict(e, 0, dtype=torch.float32) for p, e in shapes.items()},
                                          "ip-adapter.bin (tiny width)")
    return adapter, torch.randn(1, 729, 1152, generator=torch.Generator().manual_seed(0))


def _sd35(model, clip, vae):
    adapter, features = _sd35_adapter()
    return apply_sd35_ip_adapter(model, adapter, features, SD35IPSettings(weight=0.8))


FLUX_TEXT, SD35_TEXT = 512, 154


def _flux_1024():
    model = tiny_flux(seed=0, depth_single_blocks=2 * TINY_FLUX["depth"])
    return model, dit_conditioning(model, tokens=FLUX_TEXT, seed=1), dit_conditioning(model, tokens=FLUX_TEXT, seed=2)


def _sd35_1024():
    model = tiny_mmdit(seed=0, pos_embed_max_size=64)   # 64 patches a side: 1024 px
    return model, dit_conditioning(model, tokens=SD35_TEXT, seed=1), dit_conditioning(model, tokens=SD35_TEXT, seed=2)


CASES = [
    Case("Flux IP-Adapter (XLabs v2)", "tiny_flux", _flux, side=1024, steps=2, goal=1.05, memory_clones=10,
         build=_flux_1024, cpu_time=True, notes="tiny core Flux (hidden 128, 2 double + 4 single blocks), 4096 image + 512 text "
                                 "tokens, every double block, 16 IP tokens; CPU seconds"),
    Case("SD3.5 IP-Adapter (InstantX)", "tiny_sd35", _sd35, side=1024, steps=2, goal=1.05, memory_clones=10,
         build=_sd35_1024, cpu_time=True, notes="tiny SD3.5-Large-layout MMDiT (depth 2, hidden 128), 4096 image + 154 text tokens, "
                                 "64 IP tokens, resampler once per step; CPU seconds"),
]
