"""CSD discriminator: the official files load unchanged, and the tower computes what OpenAI CLIP's
VisionTransformer computes on the same weights (written out here from the official key names)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stylekit.style_discriminator.csd import guidance_preprocess, preprocess
from stylekit.style_discriminator.files import (StyleDiscriminatorFileError, load_style_discriminator,
                                                read_style_discriminator)
from stylekit.tests.fixtures.registry import CSD_CHECKPOINT, CSD_SAFETENSORS, IP_ADAPTER_SD15


@pytest.fixture
def csd(comfy_host):
    return load_style_discriminator(CSD_CHECKPOINT.filename)


def _official_state_dict() -> dict[str, torch.Tensor]:
    data = torch.load(CSD_CHECKPOINT.linked_path(), map_location="cpu", weights_only=False)
    return {k[len("module."):]: v.double() for k, v in data["model_state_dict"].items()}


def _openai_clip_visual(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenAI CLIP's VisionTransformer.forward without proj (CSD sets it to None), from its key names."""
    b = "backbone."
    x = F.conv2d(pixels, sd[b + "conv1.weight"], stride=sd[b + "conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd[b + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[b + "positional_embedding"]
    ln = lambda t, name: F.layer_norm(t, t.shape[-1:], sd[b + name + ".weight"], sd[b + name + ".bias"], 1e-5)
    x = ln(x, "ln_pre")
    i = 0
    while f"{b}transformer.resblocks.{i}.ln_1.weight" in sd:
        r = f"transformer.resblocks.{i}."
        h = ln(x, r + "ln_1").transpose(0, 1)  # nn.MultiheadAttention's (L, N, E)
        h, _ = F.multi_head_attention_forward(h, h, h, h.shape[-1], heads, sd[b + r + "attn.in_proj_weight"],
                                              sd[b + r + "attn.in_proj_bias"], None, None, False, 0.0,
                                              sd[b + r + "attn.out_proj.weight"], sd[b + r + "attn.out_proj.bias"],
                                              need_weights=False)
        x = x + h.transpose(0, 1)
        h = F.linear(ln(x, r + "ln_2"), sd[b + r + "mlp.c_fc.weight"], sd[b + r + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, sd[b + r + "mlp.c_proj.weight"], sd[b + r + "mlp.c_proj.bias"])
        i += 1
    return ln(x[:, 0, :], "ln_post")


def test_the_official_checkpoint_and_the_safetensors_export_give_the_same_embeddings(csd):
    other = load_style_discriminator(CSD_SAFETENSORS.filename)
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(csd.style_embeddings(images), other.style_embeddings(images))


def test_the_size_is_read_from_the_weights(csd):
    c = csd.config
    assert (c.width, c.layers, c.patch_size, c.image_size, c.heads, c.embed_dim) == (64, 2, 14, 224, 1, 768)


def test_feature_and_heads_match_openai_clip_visual_tower_written_out(csd):
    sd = _official_state_dict()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_feature = _openai_clip_visual(sd, pixels, heads=csd.config.heads)
    model = csd.load()
    with torch.inference_mode(False):
        model_64 = type(model)(model.config, dtype=torch.float64)
        model_64.load_state_dict(model.state_dict())
        feature, content, style = model_64(pixels)
    torch.testing.assert_close(feature, expected_feature, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(style, F.normalize(expected_feature @ sd["last_layer_style"], dim=1))
    torch.testing.assert_close(content, F.normalize(expected_feature @ sd["last_layer_content"], dim=1))


def test_preprocessing_matches_torchvision_resize_crop_normalize(comfy_host):
    from torchvision import transforms

    images = torch.rand(1, 90, 130, 3, generator=torch.Generator().manual_seed(2))
    reference = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(224),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])(images.movedim(-1, 1))
    torch.testing.assert_close(preprocess(images), reference, rtol=1e-5, atol=1e-5)


def test_guidance_preprocessing_is_the_official_guidance_codes_resize_and_normalize(comfy_host):
    # InstantStyle-Plus cond_fn: clip_model(normalize(transforms.Resize(224)(image))) on the
    # decoded tensor: bilinear (antialiased), shorter side to 224, no crop.
    from torchvision import transforms

    images = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(3))
    official = transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(
        transforms.Resize(224)(images.movedim(-1, 1)))
    torch.testing.assert_close(guidance_preprocess(images), official, rtol=1e-5, atol=1e-5)
    # It is not the evaluation preprocessing (bicubic): the two differ.
    assert (guidance_preprocess(images) - preprocess(images)).abs().max() > 1e-3


def test_a_file_that_is_not_csd_is_refused_with_the_reason(comfy_host):
    with pytest.raises(StyleDiscriminatorFileError, match="backbone"):
        read_style_discriminator(str(IP_ADAPTER_SD15.linked_path()))


def test_the_similarity_node_scores_an_image_against_itself_as_one(csd):
    from stylekit.nodes.style_guidance import StyleKitStyleSimilarity

    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    out = StyleKitStyleSimilarity.execute(csd, images[:1], images[:1])
    assert abs(out.result[0] - 1.0) < 1e-5
    mixed = StyleKitStyleSimilarity.execute(csd, images, images[:1])
    assert mixed.result[0] < 1.0 and "image 1" in mixed.result[1]


def test_the_loader_node_names_itself_the_input_and_the_fix_for_a_wrong_file(comfy_host, tmp_path):
    import folder_paths

    from stylekit.nodes.style_guidance import StyleKitStyleDiscriminatorLoader

    with pytest.raises(ValueError, match="StyleKit Style Discriminator Loader: input 'discriminator_file'"):
        StyleKitStyleDiscriminatorLoader.execute("missing.pth")
    assert "checkpoint.pth" in folder_paths.get_filename_list("style_discriminators")
