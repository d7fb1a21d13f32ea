"""A tiny core-class Flux built directly (no checkpoint, no detection) for host tests of DiT code.

Core's detection fixes Flux's width at 3072 (DESIGN §6); built directly, core's own
`comfy.ldm.flux.model.Flux` runs at hidden 128, 2 heads, axes_dim [16, 24, 24], 2 double + 2
single blocks (~2.5 M parameters), inside core's `model_base.Flux` (Flux latent format,
ModelSamplingFlux + CONST) and a real ModelPatcher: everything but the width is Flux.1-dev's.
Conditioning is given as tensors (core's Flux text encoder is always T5-XXL).
"""
from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

from stylekit.tests.fixtures.random_weights import random_tensor

TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over core's Flux model at TINY_FLUX, seeded random weights (fixtures' scales)."""
    config = comfy.supported_models.Flux(TINY_FLUX)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    net = model.diffusion_model
    net.load_state_dict({k: random_tensor(k, tuple(v.shape), seed, dtype) for k, v in net.state_dict().items()})
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def tiny_flux_conditioning(seed: int = 0, text_tokens: int = 6, guidance: float = 3.5) -> list:
    """A CONDITIONING for the tiny Flux: text tokens, pooled vector and Flux guidance."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, text_tokens, TINY_FLUX["context_in_dim"], generator=g)
    pooled = torch.randn(1, TINY_FLUX["vec_in_dim"], generator=g)
    return [[text, {"pooled_output": pooled, "guidance": guidance}]]
