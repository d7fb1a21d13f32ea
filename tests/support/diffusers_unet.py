"""A diffusers UNet2DConditionModel twin of a loaded ComfyUI UNet: same topology, same weights.

Parity tests run the reference implementation (diffusers, a test dependency) on exactly the
weights ComfyUI runs. The config is derived from ComfyUI's unet_config, the weights are mapped
with ComfyUI's own diffusers <-> ldm key map (`comfy.utils.unet_to_diffusers`) and loaded strict.
"""
from __future__ import annotations

import torch


def diffusers_config(unet_config: dict) -> dict:
    """UNet2DConditionModel kwargs equivalent to a ComfyUI SD1.x / SD2.x / SDXL unet_config."""
    levels = len(unet_config["channel_mult"])
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    depth_in = unet_config["transformer_depth"]  # two entries (one per res block) per level
    has_attention = [depth_in[2 * i] > 0 for i in range(levels)]
    head_channels = unet_config.get("num_head_channels", -1)
    heads = [unet_config["num_heads"] if head_channels == -1 else c // head_channels for c in channels]
    config = dict(
        sample_size=32, in_channels=unet_config["in_channels"], out_channels=unet_config["out_channels"],
        block_out_channels=channels, layers_per_block=unet_config["num_res_blocks"][0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        # Legacy diffusers naming: attention_head_dim is the number of heads per level.
        attention_head_dim=heads,
        transformer_layers_per_block=[max(depth_in[2 * i], 1) for i in range(levels)],
        cross_attention_dim=unet_config["context_dim"],
        use_linear_projection=unet_config["use_linear_in_transformer"],
    )
    if unet_config.get("adm_in_channels"):
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=unet_config["adm_in_channels"])
    mid = unet_config.get("transformer_depth_middle")
    if mid is not None and mid != config["transformer_layers_per_block"][-1]:
        raise ValueError(f"middle depth {mid} differs from the last level's; diffusers cannot express it")
    return config


def diffusers_twin(model_patcher) -> torch.nn.Module:
    """A float32 UNet2DConditionModel with the weights of model_patcher's UNet."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet_config = model_patcher.model.model_config.unet_config
    with torch.device("meta"):
        twin = UNet2DConditionModel(**diffusers_config(unet_config))
    ldm = model_patcher.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    # The map lists both diffusers names of the SDXL label embedding (class_embedding for
    # class-conditioned UNets, add_embedding for text_time ones): keep the twin's own.
    wanted = set(twin.state_dict())
    # clone(): the host may have loaded the weights under inference mode, and such tensors cannot
    # become parameters of another module outside it.
    state = {name: ldm[ldm_name].float().clone() for name, ldm_name in mapping.items()
             if ldm_name in ldm and name in wanted}
    twin.load_state_dict(state, strict=True, assign=True)
    return twin.eval().requires_grad_(False)


def sdxl_adm(twin, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """ComfyUI's `y` for an SDXL UNet from diffusers' added_cond_kwargs (pooled text + size/crop ids),
    computed with the twin's own time projection so both sides see the same vector."""
    time_embeds = twin.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    return torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)
