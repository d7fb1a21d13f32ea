"""The encode stages with core's CLIP vision model: features, the uncond choice, negative images,
several references, the pairing check, and InstantStyle's content subtraction."""
from __future__ import annotations

import pytest
import torch

from stylekit.ip_adapter.content import ContentSubtractionError, pooled_text_embeds, subtract_content
from stylekit.ip_adapter.encode import (_UNCOND_CACHE, ClipVisionMismatch, ImageEmbeds, check_clip_vision,
                                        encode_images, image_tokens)
from stylekit.ip_adapter.files import load_ip_adapter
from stylekit.ip_adapter.model import IMAGE_EMBEDS, PENULTIMATE
from stylekit.tests.fixtures.registry import CLIP_TEXT_VIT_H, CLIP_VISION_VIT_H
from stylekit.tests.support.host import load_clip_vision

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(autouse=True)
def _as_comfy_runs_prompts():
    """ComfyUI executes every node under inference mode; so do these tests (no autograd graphs
    holding core's casted weights alive)."""
    with torch.inference_mode():
        yield


@pytest.fixture
def vit_h(comfy_host):
    return load_clip_vision(CLIP_VISION_VIT_H.filename)


def _images(n: int, seed: int = 0, side: int = 224) -> torch.Tensor:
    return torch.rand(n, side, side, 3, generator=torch.Generator().manual_seed(seed))


def test_base_adapters_read_image_embeds_with_zero_uncond(vit_h):
    embeds = encode_images(vit_h, _images(1), IMAGE_EMBEDS)
    assert embeds.cond.shape == (1, 1024) and torch.equal(embeds.uncond, torch.zeros(1, 1024))
    assert torch.allclose(embeds.cond, vit_h.encode_image(_images(1)).image_embeds.float())


def test_plus_uncond_is_the_encoding_of_a_zero_normalised_image_not_of_a_black_one(vit_h):
    """The reference implementations encode zeros after CLIP normalisation: a picture of the CLIP mean colour."""
    embeds = encode_images(vit_h, _images(2), PENULTIMATE)
    assert embeds.cond.shape == embeds.uncond.shape == (2, 257, 1280)
    assert torch.equal(embeds.uncond[0], embeds.uncond[1])
    zeros = vit_h.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()[0]
    mean_grey = torch.tensor(CLIP_MEAN).expand(1, 224, 224, 3)
    grey = vit_h.encode_image(mean_grey).penultimate_hidden_states.float()[0]
    black = vit_h.encode_image(torch.zeros(1, 224, 224, 3)).penultimate_hidden_states.float()[0]
    assert torch.allclose(embeds.uncond[0], zeros, atol=1e-5)
    # Through core's preprocessing a mean-grey picture comes within 8-bit rounding of those zeros;
    # the incumbent pack's black picture is far away.
    assert (embeds.uncond[0] - grey).abs().mean() < 0.25 * (embeds.uncond[0] - black).abs().mean()


def test_a_negative_image_replaces_the_unconditional_reference(vit_h):
    negative = _images(1, seed=9)
    embeds = encode_images(vit_h, _images(2), IMAGE_EMBEDS, negative_images=negative)
    expected = vit_h.encode_image(negative).image_embeds.float()
    assert torch.allclose(embeds.uncond, expected.expand(2, -1))
    with pytest.raises(ValueError, match="3 negative images for 2 reference images"):
        encode_images(vit_h, _images(2), IMAGE_EMBEDS, negative_images=_images(3))


def test_zero_uncond_is_zero_features_and_the_tower_runs_for_the_references_only(vit_h, monkeypatch):
    # InstantX SD3.5's uncond (diffusers): zero features, so no zero image is encoded for it.
    calls = []
    forward = vit_h.model.forward
    monkeypatch.setattr(vit_h.model, "forward", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    embeds = encode_images(vit_h, _images(2), PENULTIMATE, zero_uncond=True)
    assert len(calls) == 1 and torch.equal(embeds.uncond, torch.zeros_like(embeds.cond))
    calls.clear()
    _UNCOND_CACHE.pop(vit_h, None)
    encode_images(vit_h, _images(2), PENULTIMATE)
    assert len(calls) == 2  # the reference uncond of plus adapters: one zero image encoded


def _counting_forwards(vit_h, monkeypatch) -> list:
    calls = []
    forward = vit_h.model.forward
    monkeypatch.setattr(vit_h.model, "forward", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    return calls


def test_unconds_that_depend_only_on_the_vision_model_are_encoded_once_per_model(vit_h, monkeypatch):
    _UNCOND_CACHE.pop(vit_h, None)
    calls = _counting_forwards(vit_h, monkeypatch)
    first = encode_images(vit_h, _images(2), PENULTIMATE)
    assert len(calls) == 2                       # the references, then the zero-normalised image
    calls.clear()
    second = encode_images(vit_h, _images(2, seed=1), PENULTIMATE)
    assert len(calls) == 1 and torch.equal(second.uncond, first.uncond)
    # XLabs Flux's uncond, a black picture: black at any size once resized and cropped, so the
    # features of one 224-pixel black image are exactly those of the reference-sized one.
    for side, forwards in ((300, 2), (512, 1)):
        calls.clear()
        embeds = encode_images(vit_h, _images(1, side=side), PENULTIMATE, black_uncond=True)
        assert len(calls) == forwards
        black = vit_h.encode_image(torch.zeros(1, side, side, 3)).penultimate_hidden_states.float()
        assert torch.equal(embeds.uncond, black)
    # What a caller does to its embeds does not reach the cache.
    second.uncond.add_(1.0)
    assert torch.equal(encode_images(vit_h, _images(2), PENULTIMATE).uncond, first.uncond)


def test_several_references_concat_their_tokens_or_average_their_features(comfy_host):
    adapter = load_ip_adapter("ip-adapter-plus_sd15.safetensors")
    g = torch.Generator().manual_seed(0)
    embeds = ImageEmbeds(cond=torch.randn(3, 257, 1280, generator=g), uncond=torch.randn(3, 257, 1280, generator=g),
                         source=PENULTIMATE)
    concat, average = image_tokens(adapter, embeds, "concat"), image_tokens(adapter, embeds, "average")
    assert concat.cond.shape == concat.uncond.shape == (1, 3 * 16, 768)
    assert average.cond.shape == (1, 16, 768)
    assert torch.allclose(concat.cond[0, 16:32], adapter.projection(embeds.cond[1:2])[0], atol=1e-5)
    assert torch.allclose(average.cond, adapter.projection(embeds.cond.mean(0, keepdim=True)), atol=1e-5)


def test_a_clip_vision_model_of_the_wrong_width_is_refused_with_the_file_to_load(vit_h):
    check_clip_vision(load_ip_adapter("ip-adapter_sdxl_vit-h.safetensors"), vit_h)
    with pytest.raises(ClipVisionMismatch, match=r"needs 1280-d CLIP image embeds \(ViT-bigG/14\) but this CLIP "
                                                 r"vision model gives 1024-d \(ViT-H/14\).*CLIP-ViT-bigG-14"):
        check_clip_vision(load_ip_adapter("ip-adapter_sdxl.safetensors"), vit_h)


def test_embeds_for_another_adapter_are_refused(comfy_host):
    plus = load_ip_adapter("ip-adapter-plus_sd15.safetensors")
    with pytest.raises(ClipVisionMismatch, match="global image embeds but .* reads penultimate hidden states"):
        image_tokens(plus, ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS))


@pytest.fixture(scope="module")
def vit_h_text(comfy_host):
    import nodes

    return nodes.CLIPLoader().load_clip(CLIP_TEXT_VIT_H.filename, type="stable_diffusion")[0]


def _encode_text(clip, text: str):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def test_content_subtraction_is_image_minus_strength_times_the_projected_text_embedding(vit_h_text):
    content = _encode_text(vit_h_text, "a house")
    text = pooled_text_embeds(content)
    assert text.shape == (1, 1024)  # the ViT-H text tower's projected pooled output, through core's CLIPLoader
    g = torch.Generator().manual_seed(0)
    embeds = ImageEmbeds(cond=torch.randn(2, 1024, generator=g), uncond=torch.zeros(2, 1024), source=IMAGE_EMBEDS)
    out = subtract_content(embeds, text, 0.8)
    assert torch.allclose(out.cond, embeds.cond - 0.8 * text)
    assert out.uncond is embeds.uncond
    assert torch.equal(subtract_content(embeds, text, 0.0).cond, embeds.cond)


def test_projected_pooled_output_is_the_text_tower_projection_of_the_eos_token(vit_h_text):
    """Independent check that core returns the *projected* pooled output (InstantStyle needs it)."""
    import comfy.model_management

    tokens = vit_h_text.tokenize("a house")
    _, pooled = vit_h_text.encode_from_tokens(tokens, return_pooled=True)
    model = vit_h_text.cond_stage_model.clip_h.transformer
    comfy.model_management.load_model_gpu(vit_h_text.patcher)
    ids = torch.tensor([[t[0] for t in tokens["h"][0]]])
    hidden = model.text_model(ids, dtype=torch.float32)[2]   # final-norm EOS token, unprojected
    assert torch.allclose(pooled.float(), model.text_projection(hidden).float(), atol=1e-4)


def test_subtraction_refuses_plus_embeds_and_text_from_another_clip_space(comfy_host, sdxl):
    hidden = ImageEmbeds(torch.zeros(1, 257, 1280), torch.zeros(1, 257, 1280), PENULTIMATE)
    with pytest.raises(ContentSubtractionError, match="plus and full-face .* base IP-Adapter"):
        subtract_content(hidden, torch.zeros(1, 1280), 0.5)
    sdxl_text = pooled_text_embeds(_encode_text(sdxl.clip, "a house"))
    assert sdxl_text.shape == (1, 1280)  # SDXL: CLIP-G's projected pooled output, bigG adapters' text space
    vit_h_embeds = ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS)
    with pytest.raises(ContentSubtractionError, match=r"1280-d \(CLIP ViT-bigG/14 text tower.*1024-d; encode the "
                                                      r"content text with the OpenCLIP ViT-H/14"):
        subtract_content(vit_h_embeds, sdxl_text, 0.5)
