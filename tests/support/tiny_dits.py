"""Core's own DiT classes at tiny width, built directly (no file, no detection) for fast parity tests.

Core's Flux detection pins hidden 3072 (DESIGN §6); built directly, its `Flux` class runs at
hidden 128 with 2 heads of 64 and axes_dim [16, 24, 24] (2.5 M params at depth 2 + 2, ~60 ms a
forward on CPU). The MMDiT (SD3 family) is sized by its depth: hidden 64·depth, depth heads of 64.
Both come wrapped in a real ModelPatcher over core's BaseModel (`comfy.model_base.Flux` / `SD3`), so
patches, transformer_options and the samplers behave as with a loaded file. Weights are the
fixtures' seeded random values (`tests/fixtures/random_weights.py`), fp32.
"""
from __future__ import annotations

import torch

from ..fixtures.random_weights import random_state_dict

TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                 hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                 axes_dim=[16, 24, 24], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def tiny_mmdit_config(depth: int = 2, qk_norm: str | None = "rms", x_block_self_attn_layers=(),
                      pos_embed_max_size: int = 16) -> dict:
    """An SD3-family config; x_block_self_attn_layers adds SD3.5-Medium's image self-attention;
    pos_embed_max_size caps the latent side at twice it (16: 256 px; 64: 1024 px)."""
    return dict(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=32,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 64, "out_features": 64 * depth}},
                pos_embed_max_size=pos_embed_max_size, num_patches=pos_embed_max_size ** 2, qk_norm=qk_norm,
                pos_embed_scaling_factor=None,
                x_block_self_attn_layers=list(x_block_self_attn_layers))


def _patcher(config_class, model_class, unet_config: dict, seed: int):
    import comfy.model_management
    import comfy.model_patcher

    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, torch.float32)
    base = model_class(model_config, device=torch.device("cpu"))
    shapes = [(k, tuple(v.shape)) for k, v in base.diffusion_model.state_dict().items()]
    base.diffusion_model.load_state_dict(random_state_dict(shapes, seed, dtype=torch.float32))
    base.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))


def tiny_flux(seed: int = 0, **overrides):
    """A ModelPatcher over core's Flux (dev: guidance embedding) at TINY_FLUX size."""
    import comfy.model_base
    import comfy.supported_models

    return _patcher(comfy.supported_models.Flux, comfy.model_base.Flux, flux_config(**overrides), seed)


def flux_config(**overrides) -> dict:
    """TINY_FLUX (with overrides) for the running core: core 0.33's FluxParams also requires
    txt_ids_dims, which its detection sets to [] for Flux.1 (text ids carry no positions)."""
    from comfy.ldm.flux.model import FluxParams

    config = {**TINY_FLUX, **overrides}
    if "txt_ids_dims" in getattr(FluxParams, "__dataclass_fields__", {}):
        config.setdefault("txt_ids_dims", [])
    return config


def tiny_mmdit(seed: int = 0, **config):
    """A ModelPatcher over core's MMDiT (SD3 family); keyword arguments go to tiny_mmdit_config."""
    import comfy.model_base
    import comfy.supported_models

    return _patcher(comfy.supported_models.SD3, comfy.model_base.SD3, tiny_mmdit_config(**config), seed)


def dit_conditioning(model, batch: int = 1, tokens: int = 8, seed: int = 0, guidance: float = 3.5) -> list:
    """A CONDITIONING for a DiT made from seeded tensors in the model's own context and pooled widths.

    Core's Flux text encoder always builds T5-XXL (DESIGN §6), so Flux graphs on the fixtures get
    their prompt this way: context (batch, tokens, context width), pooled_output, and guidance.
    """
    dit = model.model.diffusion_model
    if hasattr(dit, "txt_in"):   # Flux
        width, pooled = dit.txt_in.in_features, dit.vector_in.in_layer.in_features
    else:                        # MMDiT
        width, pooled = dit.context_embedder.in_features, dit.y_embedder.mlp[0].in_features
    return _conditioning(width, pooled, batch, tokens, seed, guidance)


def tiny_flux_conditioning(seed: int = 0, tokens: int = 6, guidance: float = 3.5) -> list:
    """dit_conditioning for a TINY_FLUX model, without building one."""
    return _conditioning(TINY_FLUX["context_in_dim"], TINY_FLUX["vec_in_dim"], 1, tokens, seed, guidance)


def _conditioning(width: int, pooled: int, batch: int, tokens: int, seed: int, guidance: float) -> list:
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, width, generator=gen)
    extra = {"pooled_output": torch.randn(batch, pooled, generator=gen), "guidance": guidance}
    return [[context, extra]]
