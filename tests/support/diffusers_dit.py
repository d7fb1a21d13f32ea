"""diffusers twins (meta device, no weights) of loaded ComfyUI diffusion models, and the key maps
between them: the reference for block names (diffusers' module names for the same architecture)."""
from __future__ import annotations

import torch


def _heads(dit) -> tuple[int, int]:
    if hasattr(dit, "double_blocks"):
        block = dit.double_blocks[0]
        return block.num_heads, block.hidden_size // block.num_heads
    attn = dit.joint_blocks[0].x_block.attn
    return attn.num_heads, attn.head_dim


def diffusers_twin_and_key_map(model_patcher) -> tuple[torch.nn.Module, dict[str, str]]:
    """(the diffusers model on the meta device, {diffusers key: ComfyUI diffusion-model key})."""
    import comfy.utils

    from .diffusers_unet import diffusers_config

    config = model_patcher.model.model_config.unet_config
    dit = model_patcher.model.diffusion_model
    with torch.device("meta"):
        if hasattr(dit, "double_blocks"):
            from diffusers import FluxTransformer2DModel

            heads, head_dim = _heads(dit)
            twin = FluxTransformer2DModel(
                patch_size=1, in_channels=config["in_channels"] * config["patch_size"] ** 2,
                num_layers=config["depth"], num_single_layers=config["depth_single_blocks"],
                attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=config["context_in_dim"], pooled_projection_dim=config["vec_in_dim"],
                guidance_embeds=config["guidance_embed"], axes_dims_rope=tuple(config["axes_dim"]))
            key_map = comfy.utils.flux_to_diffusers({"depth": config["depth"], "hidden_size": heads * head_dim,
                                                     "depth_single_blocks": config["depth_single_blocks"]})
        elif hasattr(dit, "joint_blocks"):
            from diffusers import SD3Transformer2DModel

            heads, head_dim = _heads(dit)
            twin = SD3Transformer2DModel(
                sample_size=32, patch_size=config["patch_size"], in_channels=config["in_channels"],
                num_layers=config["depth"], attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=config["context_embedder_config"]["params"]["in_features"],
                caption_projection_dim=heads * head_dim, pooled_projection_dim=config["adm_in_channels"],
                out_channels=config["out_channels"], pos_embed_max_size=config["pos_embed_max_size"],
                qk_norm="rms_norm" if config.get("qk_norm") == "rms" else None,
                dual_attention_layers=tuple(config.get("x_block_self_attn_layers", ())))
            key_map = comfy.utils.mmdit_to_diffusers(config)
        else:
            from diffusers import UNet2DConditionModel

            twin = UNet2DConditionModel(**diffusers_config(config))
            key_map = comfy.utils.unet_to_diffusers(config)
    # Core 0.33's maps also name aliases of the same weights (LyCORIS LoKr keys) that the twin lacks.
    keys = set(twin.state_dict())
    return twin, {k: v for k, v in key_map.items() if k in keys}
