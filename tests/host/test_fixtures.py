"""The tiny fixtures load through core's own loaders as the real model types."""
from __future__ import annotations

import torch

from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, FIXTURES


def test_checkpoints_are_detected_as_sd15_and_sdxl(sd15, sdxl):
    assert type(sd15.model.model.model_config).__name__ == "SD15"
    assert type(sdxl.model.model.model_config).__name__ == "SDXL"
    assert type(sd15.vae.first_stage_model).__name__ == "TAESD"


def test_clip_vision_fixture_loads_as_vit_h_with_its_real_widths(comfy_host):
    import comfy.clip_vision
    import folder_paths

    clip_vision = comfy.clip_vision.load(folder_paths.get_full_path("clip_vision", CLIP_VISION_VIT_H.filename))
    out = clip_vision.encode_image(torch.rand(1, 224, 224, 3))
    assert out.image_embeds.shape == (1, 1024)
    assert out.penultimate_hidden_states.shape == (1, 257, 1280)


def test_fixture_files_are_linked_under_their_real_names_and_cached_by_content(comfy_host):
    for fixture in FIXTURES:
        link = fixture.linked_path()
        assert link.is_symlink() and link.resolve() == fixture.stored_path()
        assert fixture.content_hash() in fixture.stored_path().name


def test_sampling_the_fixtures_is_finite_and_deterministic(checkpoint):
    import nodes

    (positive,) = nodes.CLIPTextEncode().encode(checkpoint.clip, "a lighthouse")
    (negative,) = nodes.CLIPTextEncode().encode(checkpoint.clip, "")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample():
        return nodes.common_ksampler(checkpoint.model, 7, 2, 4.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    first, second = sample(), sample()
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    assert torch.equal(first, second)


def test_dit_fixtures_are_detected_as_flux_dev_and_sd35_with_rms_qk_norm(flux_dev, sd35):
    flux_config = flux_dev.model.model_config
    assert type(flux_config).__name__ == "Flux" and flux_config.unet_config["guidance_embed"]
    assert (flux_config.unet_config["hidden_size"], flux_config.unet_config["depth"],
            flux_config.unet_config["depth_single_blocks"]) == (3072, 1, 1)
    sd3_config = sd35.model.model_config
    assert type(sd3_config).__name__ == "SD3" and sd3_config.unet_config["qk_norm"] == "rms"
    assert sd3_config.unet_config["depth"] == 2


def test_dits_sample_from_tensor_conditioning_without_a_text_encoder(flux_dev, sd35):
    """Flux's text encoder needs T5-XXL (no tiny one exists): CONDITIONING from tensors drives them."""
    import nodes

    from stylekit.tests.support.tiny_dits import dit_conditioning

    for model in (flux_dev, sd35):
        positive, negative = dit_conditioning(model, seed=1), dit_conditioning(model, seed=2)
        latent = {"samples": torch.zeros(1, 16, 16, 16)}
        out = nodes.common_ksampler(model, 3, 2, 1.0, "euler", "simple", positive, negative, latent)[0]["samples"]
        assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all() and out.abs().sum() > 0
