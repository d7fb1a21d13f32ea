"""The XLabs Flux IP-Adapter patch on core's Flux equals diffusers' FluxTransformer2DModel with
FluxIPAdapterAttnProcessor on the same weights and per-layer scales; masks (regional: two adapters,
two masks), stacking with other block replaces and with other packs' attention overrides, patch
hits and a clean next run.

Tiny core Flux (hidden 128, 2 double + 2 single blocks), an XLabs-layout adapter file at small
widths (context 48, CLIP width 24), fp32; the diffusers twin is loaded from the core model's
weights through core's own flux_to_diffusers key map.
"""
from __future__ import annotations

import pytest
import torch

from stylekit.dit_adapters.xlabs_flux import xlabs_flux_from_state_dict
from stylekit.host.block_weights import CUSTOM
from stylekit.patching.flux_ip_adapter import (FluxIPSettings, apply_flux_ip_adapter, flux_image_tokens)
from stylekit.patching.ip_adapter import AdapterMismatch
from stylekit.tests.fixtures.dit_ip_adapters import xlabs_flux_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict
from stylekit.tests.host.dit_ip_support import (flux_block_output, flux_diffusers_forward, flux_forward,
                                              loaded_twin, other_packs_overrides)
from stylekit.tests.support.tiny_dits import TINY_FLUX, tiny_flux, tiny_mmdit

HIDDEN, CONTEXT, CLIP, TOKENS, TEXT = TINY_FLUX["hidden_size"], 48, 24, 4, 6


def adapter_file(seed: int) -> dict:
    return {k: v.float() for k, v in random_state_dict(xlabs_flux_shapes(TOKENS, 2, HIDDEN, CONTEXT, CLIP), seed).items()}


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=11)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(12)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), t=torch.tensor([0.7]),
                context=torch.randn(1, TEXT, TINY_FLUX["context_in_dim"], generator=g),
                y=torch.randn(1, TINY_FLUX["vec_in_dim"], generator=g), guidance=torch.tensor([3.5]))


@pytest.fixture(scope="module")
def twin(flux):
    return loaded_twin(flux)


def embeds(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randn(n, CLIP, generator=torch.Generator().manual_seed(seed))


def test_the_diffusers_twin_is_cores_flux_without_adapter(flux, twin, inputs):
    ours, theirs = flux_forward(flux, inputs), flux_diffusers_forward(twin, inputs)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("scales, blocks, spec", [
    ([0.8, 0.8], "all blocks", ""),
    ([0.0, 0.8], CUSTOM, "double 1"),
    ([0.0, 0.8], CUSTOM, [0.0, 1.0]),       # diffusers' list, one scale per double block
])
def test_patched_flux_equals_diffusers_ip_adapter_with_the_same_per_layer_scales(flux, twin, inputs, scales, blocks, spec):
    file = adapter_file(13)
    adapter = xlabs_flux_from_state_dict(file, "a")
    tokens = flux_image_tokens(adapter, embeds(14))
    m = apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(weight=0.8, blocks=blocks, block_weights=spec))
    ours = flux_forward(m, inputs)
    theirs = flux_diffusers_forward(twin, inputs, [(file, tokens.cond)], [scales])
    plain = flux_diffusers_forward(twin, inputs)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() < 1e-4 * scale
    assert (theirs - plain).abs().max() > 1e-2 * scale      # the adapter matters at this scale
    if scales[0] == 0:   # a selection shifted by one block is told apart
        shifted = flux_diffusers_forward(twin, inputs, [(file, tokens.cond)], [scales[::-1]])
        assert (ours - shifted).abs().max() > 1e-2 * scale


def test_two_stacked_adapters_equal_diffusers_with_two_adapters(flux, twin, inputs):
    files = [adapter_file(15), adapter_file(16)]
    adapters = [xlabs_flux_from_state_dict(f, n) for f, n in zip(files, "ab")]
    tokens = [flux_image_tokens(a, embeds(17 + i)) for i, a in enumerate(adapters)]
    m = apply_flux_ip_adapter(flux, adapters[0], tokens[0], FluxIPSettings(weight=0.7))
    m = apply_flux_ip_adapter(m, adapters[1], tokens[1], FluxIPSettings(weight=0.5, blocks=CUSTOM, block_weights=[1.0, 0.4]))
    ours = flux_forward(m, inputs)
    theirs = flux_diffusers_forward(twin, inputs, [(files[0], tokens[0].cond), (files[1], tokens[1].cond)],
                               [[0.7, 0.7], [0.5, 0.2]])
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_a_mask_keeps_outside_tokens_plain_and_inside_tokens_as_the_unmasked_adapter(flux, inputs):
    adapter = xlabs_flux_from_state_dict(adapter_file(18), "a")
    tokens = flux_image_tokens(adapter, embeds(19))
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0   # left half of the image: token columns 0-1 of the 4x4 grid
    last = dict(blocks=CUSTOM, block_weights="double 1")
    plain = flux_block_output(flux, inputs, 1)
    full = flux_block_output(apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(**last)), inputs, 1)
    masked = flux_block_output(apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(**last, attn_mask=mask)), inputs, 1)
    inside = (torch.arange(16) % 4) < 2
    scale = full.abs().max()
    assert (masked[:, ~inside] - plain[:, ~inside]).abs().max() < 1e-5 * scale
    assert (masked[:, inside] - full[:, inside]).abs().max() < 1e-5 * scale
    assert (full[:, inside] - plain[:, inside]).abs().max() > 1e-2 * scale


def test_two_adapters_with_two_masks_each_give_their_region_as_alone(flux, inputs):
    adapters = [xlabs_flux_from_state_dict(adapter_file(27 + i), f"a{i}") for i in range(2)]
    tokens = [flux_image_tokens(a, embeds(29 + i)) for i, a in enumerate(adapters)]
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    last = dict(blocks=CUSTOM, block_weights="double 1")
    alone = [flux_block_output(apply_flux_ip_adapter(flux, a, t, FluxIPSettings(**last)), inputs, 1)
             for a, t in zip(adapters, tokens)]
    m = apply_flux_ip_adapter(flux, adapters[0], tokens[0], FluxIPSettings(**last, attn_mask=left))
    m = apply_flux_ip_adapter(m, adapters[1], tokens[1], FluxIPSettings(**last, attn_mask=1.0 - left))
    regional = flux_block_output(m, inputs, 1)
    inside = (torch.arange(16) % 4) < 2
    scale = regional.abs().max()
    assert (regional[:, inside] - alone[0][:, inside]).abs().max() < 1e-5 * scale
    assert (regional[:, ~inside] - alone[1][:, ~inside]).abs().max() < 1e-5 * scale
    assert (alone[0] - alone[1]).abs().max() > 1e-2 * scale   # the two references differ at this scale


def test_every_patch_is_hit_once_over_another_packs_replace_and_the_next_plain_run_is_identical(flux, inputs):
    before = flux_forward(flux, inputs)
    base = flux.clone()
    calls = {i: 0 for i in range(TINY_FLUX["depth"])}

    def other_pack(i):   # a plain function, as many packs install: clones share it (deepcopy keeps functions)
        def replace(args, extra):
            calls[i] += 1
            return extra["original_block"](args)
        return replace

    for i in calls:
        base.set_model_patch_replace(other_pack(i), "dit", "double_block", i)
    adapters = [xlabs_flux_from_state_dict(adapter_file(20 + i), f"a{i}") for i in range(2)]
    m = base
    for a in adapters:
        m = apply_flux_ip_adapter(m, a, flux_image_tokens(a, embeds(22)), FluxIPSettings(weight=0.6))
    replaces = m.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(replaces) == [("double_block", 0), ("double_block", 1)]
    patched = flux_forward(m, inputs)
    assert calls == {0: 1, 1: 1}   # each chain ran down to the other pack's replace once
    assert (patched - before).abs().max() > 1e-3 * before.abs().max()
    assert "patches_replace" not in flux.model_options["transformer_options"]
    assert torch.equal(flux_forward(flux, inputs), before)


def test_other_packs_attention_overrides_set_before_and_after_ours_both_run_chained(flux, twin, inputs, monkeypatch):
    # The one optimized_attention_override slot (DESIGN §6): a pack that set it before our adapter and one
    # that chains onto it after both run, on core's joint attention and on our image attention alike.
    import diffusers.models.transformers.transformer_flux as diffusers_flux

    packs = other_packs_overrides()
    base = flux.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = packs.before
    file = adapter_file(31)
    adapter = xlabs_flux_from_state_dict(file, "a")
    tokens = flux_image_tokens(adapter, embeds(32))
    m = apply_flux_ip_adapter(base, adapter, tokens, FluxIPSettings(weight=0.8))
    below = m.model_options["transformer_options"]["optimized_attention_override"]
    assert below is packs.before   # ours did not take the slot
    m.model_options["transformer_options"]["optimized_attention_override"] = packs.chained_after(below)
    ours = flux_forward(m, inputs)
    attention_calls = 2 * TINY_FLUX["depth"] + TINY_FLUX["depth_single_blocks"]   # joint + ours per double, single
    assert packs.calls == {"before": attention_calls, "after": attention_calls}

    dispatch = diffusers_flux.dispatch_attention_fn
    monkeypatch.setattr(diffusers_flux, "dispatch_attention_fn", packs.reference(dispatch))
    theirs = flux_diffusers_forward(twin, inputs, [(file, tokens.cond)], [[0.8, 0.8]])
    monkeypatch.undo()
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() < 1e-4 * scale
    without_overrides = flux_forward(apply_flux_ip_adapter(flux, adapter, tokens, FluxIPSettings(weight=0.8)), inputs)
    assert (ours - without_overrides).abs().max() > 1e-2 * scale


def test_a_flux_adapter_on_sd3_and_mismatched_vision_features_are_refused(flux):
    adapter = xlabs_flux_from_state_dict(adapter_file(23), "flux-ip-adapter.safetensors")
    with pytest.raises(AdapterMismatch, match="XLabs Flux IP-Adapter but the model is an SD3"):
        apply_flux_ip_adapter(tiny_mmdit(seed=1), adapter, flux_image_tokens(adapter, embeds(1)), FluxIPSettings())
    with pytest.raises(AdapterMismatch, match="CLIP ViT-L/14"):
        flux_image_tokens(adapter, torch.zeros(1, 1024))


def test_a_masked_adapter_samples_with_cfg_and_a_window_and_leaves_the_model_clean(flux):
    # Through core's sampler: cond/uncond chunks, sigmas for the window, the token-grid wrapper.
    import comfy.sample
    import comfy.samplers

    from stylekit.tests.support.tiny_dits import tiny_flux_conditioning

    adapter = xlabs_flux_from_state_dict(adapter_file(24), "a")
    mask = torch.zeros(1, 11, 13)
    mask[:, 5:] = 1.0   # lower half of an 11x13 latent (odd sides: core pads to the 6x7 token grid)
    m = apply_flux_ip_adapter(flux, adapter, flux_image_tokens(adapter, embeds(25), torch.zeros(1, CLIP)),
                              FluxIPSettings(weight=1.0, end_percent=0.6, attn_mask=mask))

    def sample(model):
        noise = torch.randn(1, 16, 11, 13, generator=torch.Generator().manual_seed(26))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3).cpu()
        return comfy.sample.sample_custom(model, noise, 2.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          tiny_flux_conditioning(1, TEXT), tiny_flux_conditioning(2, TEXT),
                                          torch.zeros_like(noise), disable_pbar=True)

    plain = sample(flux)
    patched = sample(m)
    assert torch.isfinite(patched).all() and (patched - plain).abs().max() > 1e-3
    assert torch.equal(sample(flux), plain)
