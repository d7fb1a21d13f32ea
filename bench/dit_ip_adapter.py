"""Flux (XLabs) and SD3.5 (InstantX) IP-Adapter cost against plain sampling (goal: per-step time
ratio <= 1.05 at 1024 px token counts, i.e. 4096 image tokens, on Flux; the tiny MMDiT caps SD3.5 at 256 tokens), and the memory of 10 chained
patched clones. Width is reduced (tiny core models of tests/support/tiny_dits.py, adapters at the
same widths in the real key layouts): the ratio, not the absolute time, is what carries over.
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
from stylekit.tests.support.tiny_dits import TINY_FLUX

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


CASES = [
    Case("Flux IP-Adapter (XLabs v2)", "tiny_flux", _flux, side=1024, steps=2, goal=1.05, memory_clones=10,
         notes="tiny core Flux (hidden 128), 4096 image tokens, every double block, 16 image tokens"),
    Case("SD3.5 IP-Adapter (InstantX)", "tiny_sd35", _sd35, side=256, steps=2, goal=1.05, memory_clones=10,
         notes="tiny SD3.5-Large-layout MMDiT (depth 2), 256 image tokens (its pos_embed_max_size 16 caps the side), resampler once per step"),
]
