"""The XLabs Flux IP-Adapter stacks with core's Redux. Core's StyleModelApply (on the Redux fixture,
loaded by core's load_style_model) appends 729 image tokens to the text conditioning, so the text
stream is 729 tokens longer; the patched Flux still equals diffusers' FluxIPAdapterAttnProcessor given
the same concatenated encoder states, the IP term reaches the image stream only (the text stream out
of the first patched block is the plain one's), and masks, cfg with an uncond of another length and
the next plain run hold.

Tiny core Flux at T5 width (context_in_dim 4096, as Redux writes), the XLabs-layout adapter at small
widths, fp32.
"""
from __future__ import annotations

import pytest
import torch

from stylekit.dit_adapters.xlabs_flux import xlabs_flux_from_state_dict
from stylekit.host.block_weights import CUSTOM
from stylekit.patching.flux_ip_adapter import FluxIPSettings, apply_flux_ip_adapter, flux_image_tokens
from stylekit.tests.fixtures.dit_ip_adapters import xlabs_flux_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict
from stylekit.tests.fixtures.registry import FLUX_REDUX
from stylekit.tests.host.dit_ip_support import flux_diffusers_forward, flux_forward, loaded_twin, recording
from stylekit.tests.support.tiny_dits import TINY_FLUX, tiny_flux

T5, TEXT, CLIP, SIGLIP_TOKENS = 4096, 6, 24, 729


def adapter_file(seed: int) -> dict:
    shapes = xlabs_flux_shapes(4, TINY_FLUX["depth"], TINY_FLUX["hidden_size"], 48, CLIP)
    return {k: v.float() for k, v in random_state_dict(shapes, seed).items()}


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=31, context_in_dim=T5)


@pytest.fixture(scope="module")
def twin(flux):
    return loaded_twin(flux)


def text_conditioning(seed: int, tokens: int = TEXT) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, T5, generator=g),
             {"pooled_output": torch.randn(1, TINY_FLUX["vec_in_dim"], generator=g), "guidance": 3.5}]]


@pytest.fixture(scope="module")
def redux_conditioning(comfy_host):
    """Core's StyleModelApply on a text conditioning, with core's Redux model and SigLIP-shaped features."""
    import comfy.clip_vision
    import comfy.sd
    import folder_paths
    import nodes

    style_model = comfy.sd.load_style_model(folder_paths.get_full_path("style_models", FLUX_REDUX.filename))
    vision = comfy.clip_vision.Output()
    vision["last_hidden_state"] = torch.randn(1, SIGLIP_TOKENS, 1152, generator=torch.Generator().manual_seed(32))
    (conditioning,) = nodes.StyleModelApply().apply_stylemodel(text_conditioning(33), style_model, vision, 1.0, "multiply")
    return conditioning


def inputs_from(conditioning) -> dict:
    context, extra = conditioning[0]
    g = torch.Generator().manual_seed(34)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), t=torch.tensor([0.7]), context=context,
                y=extra["pooled_output"], guidance=torch.tensor([extra["guidance"]]))


def adapter_and_tokens(seed: int):
    file = adapter_file(seed)
    adapter = xlabs_flux_from_state_dict(file, "a")
    return file, adapter, flux_image_tokens(adapter, torch.randn(1, CLIP, generator=torch.Generator().manual_seed(seed)))


def test_redux_tokens_lengthen_the_text_and_the_patched_flux_equals_diffusers_on_them(flux, twin, redux_conditioning):
    inputs = inputs_from(redux_conditioning)
    assert inputs["context"].shape == (1, TEXT + SIGLIP_TOKENS, T5)
    file, adapter, tokens = adapter_and_tokens(35)
    m = apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(weight=0.8, blocks=CUSTOM, block_weights=[1.0, 0.5]))
    ours = flux_forward(m, inputs)
    theirs = flux_diffusers_forward(twin, inputs, [(file, tokens.cond)], [[0.8, 0.4]])
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() < 1e-4 * scale
    plain = flux_diffusers_forward(twin, inputs)
    assert (theirs - plain).abs().max() > 1e-2 * scale                                 # the adapter matters
    text_only = flux_diffusers_forward(twin, inputs_from(text_conditioning(33)))
    assert (plain - text_only).abs().max() > 1e-2 * scale                              # and so does Redux


def test_the_ip_term_reaches_the_image_stream_only_and_a_mask_still_fits_the_image_grid(flux, redux_conditioning):
    inputs = inputs_from(redux_conditioning)
    _, adapter, tokens = adapter_and_tokens(36)
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    first = dict(blocks=CUSTOM, block_weights="double 0")
    outputs = {}
    for name, model in {"plain": flux,
                        "full": apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(**first)),
                        "masked": apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(**first, attn_mask=left))}.items():
        m, recorder = recording(model, 0)
        flux_forward(m, inputs)
        outputs[name] = recorder
    plain, full, masked = (outputs[k] for k in ("plain", "full", "masked"))
    assert full.txt.shape[1] == TEXT + SIGLIP_TOKENS and full.img.shape[1] == 16
    assert torch.equal(full.txt, plain.txt) and torch.equal(masked.txt, plain.txt)
    inside = (torch.arange(16) % 4) < 2
    scale = full.img.abs().max()
    assert (masked.img[:, ~inside] - plain.img[:, ~inside]).abs().max() < 1e-5 * scale
    assert (masked.img[:, inside] - full.img[:, inside]).abs().max() < 1e-5 * scale
    assert (full.img - plain.img).abs().max() > 1e-2 * scale


def test_sampling_with_redux_cond_and_a_plain_uncond_of_another_length_leaves_the_model_clean(flux, redux_conditioning):
    # Core runs cond (735 text tokens) and uncond (6) in separate passes: each pass is one chunk.
    import comfy.sample
    import comfy.samplers

    _, adapter, tokens = adapter_and_tokens(37)
    m = apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(weight=1.0))

    def sample(model):
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(38))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2).cpu()
        return comfy.sample.sample_custom(model, noise, 2.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          redux_conditioning, text_conditioning(39), torch.zeros_like(noise),
                                          disable_pbar=True)

    plain = sample(flux)
    patched = sample(m)
    assert torch.isfinite(patched).all() and (patched - plain).abs().max() > 1e-3
    assert torch.equal(sample(flux), plain)
