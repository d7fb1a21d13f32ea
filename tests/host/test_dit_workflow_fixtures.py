"""The DiT workflows' fixtures load through core's own loaders (and ours) as the real model types."""
from __future__ import annotations

from stylekit.tests.fixtures.registry import (CLIP_VISION_VIT_L, FLUX_VAE, INSTANTX_SD35, SD35_CHECKPOINT,
                                              SIGLIP_VISION_384)
from stylekit.tests.support.host import load_checkpoint, load_clip_vision


# Core picks each tower's config from the file's keys; the loaded module's shapes say which one
# (no forward pass: a SigLIP encode at 384 px costs ~20 s on CPU; the workflows run one).
def test_clip_vit_l_fixture_loads_as_vit_l_with_768_d_image_embeds(comfy_host):
    clip_vision = load_clip_vision(CLIP_VISION_VIT_L.filename)
    tower = clip_vision.model
    assert clip_vision.image_size == 224 and len(tower.vision_model.encoder.layers) == 24
    assert tuple(tower.visual_projection.weight.shape) == (768, 1024)  # image embeds 768-d, what XLabs reads


def test_siglip_fixture_loads_as_so400m_patch14_384(comfy_host):
    clip_vision = load_clip_vision(SIGLIP_VISION_384.filename)
    tower = clip_vision.model.vision_model
    assert clip_vision.image_size == 384 and clip_vision.return_all_hidden_states
    assert len(tower.encoder.layers) == 27
    assert tuple(tower.embeddings.position_embedding.weight.shape) == (729, 1152)  # 27 × 27 patches, width 1152


def test_flux_vae_fixture_loads_as_a_16_channel_vae_without_quant_convs(comfy_host):
    import nodes

    (vae,) = nodes.VAELoader().load_vae(FLUX_VAE.filename)
    assert vae.latent_channels == 16 and vae.downscale_ratio == 8
    assert type(vae.first_stage_model).__name__ == "AutoencodingEngine"


def test_sd35_single_file_loads_as_sd3_with_its_vae_and_no_text_encoder(comfy_host):
    model, clip, vae = load_checkpoint(SD35_CHECKPOINT.filename)
    config = model.model.model_config
    assert type(config).__name__ == "SD3" and config.unet_config["qk_norm"] == "rms"
    assert clip is None
    assert vae.latent_channels == 16 and type(vae.first_stage_model).__name__ == "AutoencodingEngine"


def test_instantx_fixture_is_read_as_an_sd35_adapter_of_the_fixture_width(comfy_host):
    from stylekit.dit_adapters.files import load_dit_adapter
    from stylekit.dit_adapters.instantx_sd35 import InstantXSD35Adapter

    adapter = load_dit_adapter(INSTANTX_SD35.filename)
    assert isinstance(adapter, InstantXSD35Adapter)
    assert adapter.clip_width == 1152 and adapter.hidden == 128 and len(adapter.layers) == 2  # depth-2 SD3.5
