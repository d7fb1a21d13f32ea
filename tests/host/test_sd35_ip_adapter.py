"""The InstantX SD3.5 IP-Adapter patch on core's MMDiT equals diffusers' SD3Transformer2DModel with
SD3IPAdapterJointAttnProcessor2_0 on the same weights and per-block scales (tiny SD3.5-Large layout:
depth 2, RMS QK-norm; resampler at small widths), and stacks over another pack's block replace; a mask
per adapter leaves the tokens outside it exactly plain (regional references)."""
from __future__ import annotations

import pytest
import torch

from stylekit.dit_adapters.files import dit_adapter_from_state_dict
from stylekit.host.block_weights import CUSTOM
from stylekit.patching.sd35_ip_adapter import SD35IPSettings, apply_sd35_ip_adapter
from stylekit.tests.fixtures.dit_ip_adapters import instantx_sd35_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict
from stylekit.tests.host.dit_ip_support import (loaded_twin, other_packs_overrides, sd35_block_output,
                                              sd35_diffusers_forward, sd35_forward)
from stylekit.tests.support.tiny_dits import tiny_mmdit

EMBED, SIGMA = 40, 0.7


def adapter_file(seed):
    shapes = instantx_sd35_shapes(joint_blocks=2, hidden=128, width=128, depth=4, queries=8, embed=EMBED, time_channels=32)
    return {part: {k: v.float() for k, v in random_state_dict(entries, seed).items()} for part, entries in shapes.items()}


@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit(seed=5)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(6)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), context=torch.randn(1, 7, 64, generator=g),
                y=torch.randn(1, 32, generator=g), features=torch.randn(1, 10, EMBED, generator=g))


@pytest.fixture(scope="module")
def twin(mmdit):
    return loaded_twin(mmdit)


def core_forward(m, inputs):
    return sd35_forward(m, inputs, SIGMA)


def diffusers_forward(twin, inputs, file=None, adapter=None, scales=()):
    return sd35_diffusers_forward(twin, inputs, SIGMA, file, adapter, scales)


def last_block_output(m, inputs):
    return sd35_block_output(m, inputs, SIGMA, 1)


def test_the_diffusers_twin_is_cores_mmdit_without_adapter(mmdit, twin, inputs):
    ours, theirs = core_forward(mmdit, inputs), diffusers_forward(twin, inputs)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("scales, blocks, spec", [([0.6, 0.6], "all blocks", ""), ([0.0, 0.6], CUSTOM, "joint 1"),
                                                  ([0.0, 0.6], CUSTOM, [0.0, 1.0])])
def test_patched_sd35_equals_diffusers_instantx_with_the_same_per_block_scales(mmdit, twin, inputs, scales, blocks, spec):
    file = adapter_file(7)
    adapter = dit_adapter_from_state_dict(file, "ip-adapter.bin")
    m = apply_sd35_ip_adapter(mmdit, adapter, inputs["features"], SD35IPSettings(weight=0.6, blocks=blocks, block_weights=spec))
    ours = core_forward(m, inputs)
    theirs = diffusers_forward(twin, inputs, file, adapter, scales)
    size = theirs.abs().max()
    assert (ours - theirs).abs().max() < 1e-4 * size
    assert (theirs - diffusers_forward(twin, inputs)).abs().max() > 1e-2 * size
    if scales[0] == 0:
        shifted = diffusers_forward(twin, inputs, file, adapter, scales[::-1])
        assert (ours - shifted).abs().max() > 1e-2 * size


def test_every_patch_is_hit_once_over_another_packs_replace_and_the_next_plain_run_is_identical(mmdit, inputs):
    before = core_forward(mmdit, inputs)
    calls = {0: 0, 1: 0}

    def other_pack(i):
        def replace(args, extra):
            calls[i] += 1
            return extra["original_block"](args)
        return replace

    base = mmdit.clone()
    for i in calls:
        base.set_model_patch_replace(other_pack(i), "dit", "double_block", i)
    adapter = dit_adapter_from_state_dict(adapter_file(8), "ip-adapter.bin")
    m = apply_sd35_ip_adapter(base, adapter, inputs["features"], SD35IPSettings(weight=0.5))
    m = apply_sd35_ip_adapter(m, adapter, inputs["features"], SD35IPSettings(weight=0.5))
    patched = core_forward(m, inputs)
    assert calls == {0: 1, 1: 1}
    assert (patched - before).abs().max() > 1e-3 * before.abs().max()
    assert torch.equal(core_forward(mmdit, inputs), before)


LEFT = (torch.arange(16) % 4) < 2   # token columns 0-1 of the 4x4 grid of an 8x8 latent


def half_mask(left: bool) -> torch.Tensor:
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    return mask if left else 1.0 - mask


def test_a_mask_keeps_outside_tokens_plain_and_inside_tokens_as_the_unmasked_adapter(mmdit, inputs):
    adapter = dit_adapter_from_state_dict(adapter_file(9), "ip-adapter.bin")
    last = dict(blocks=CUSTOM, block_weights="joint 1")
    plain = last_block_output(mmdit, inputs)
    full = last_block_output(apply_sd35_ip_adapter(mmdit, adapter, inputs["features"], SD35IPSettings(**last)), inputs)
    masked = last_block_output(apply_sd35_ip_adapter(mmdit, adapter, inputs["features"],
                                                     SD35IPSettings(**last, attn_mask=half_mask(left=True))), inputs)
    scale = full.abs().max()
    assert (masked[:, ~LEFT] - plain[:, ~LEFT]).abs().max() < 1e-5 * scale
    assert (masked[:, LEFT] - full[:, LEFT]).abs().max() < 1e-5 * scale
    assert (full[:, LEFT] - plain[:, LEFT]).abs().max() > 1e-2 * scale


def test_two_adapters_with_two_masks_each_give_their_region_as_alone(mmdit, inputs):
    adapters = [dit_adapter_from_state_dict(adapter_file(10 + i), "ip-adapter.bin") for i in range(2)]
    features = [inputs["features"], torch.randn(1, 10, EMBED, generator=torch.Generator().manual_seed(12))]
    last = dict(blocks=CUSTOM, block_weights="joint 1")
    alone = [last_block_output(apply_sd35_ip_adapter(mmdit, a, f, SD35IPSettings(**last)), inputs)
             for a, f in zip(adapters, features)]
    m = apply_sd35_ip_adapter(mmdit, adapters[0], features[0], SD35IPSettings(**last, attn_mask=half_mask(left=True)))
    m = apply_sd35_ip_adapter(m, adapters[1], features[1], SD35IPSettings(**last, attn_mask=half_mask(left=False)))
    regional = last_block_output(m, inputs)
    scale = regional.abs().max()
    assert (regional[:, LEFT] - alone[0][:, LEFT]).abs().max() < 1e-5 * scale
    assert (regional[:, ~LEFT] - alone[1][:, ~LEFT]).abs().max() < 1e-5 * scale
    assert (alone[0] - alone[1]).abs().max() > 1e-2 * scale   # the two references differ at this scale


def test_a_masked_adapter_samples_with_cfg_and_a_window_and_leaves_the_model_clean(mmdit, inputs):
    # Through core's sampler: cond/uncond chunks, sigmas for the window, the APPLY_MODEL grid wrapper.
    import comfy.sample
    import comfy.samplers

    from stylekit.tests.support.tiny_dits import dit_conditioning

    adapter = dit_adapter_from_state_dict(adapter_file(13), "ip-adapter.bin")
    mask = torch.zeros(1, 11, 13)
    mask[:, 5:] = 1.0   # lower half of an 11x13 latent (odd sides: core pads to the 6x7 token grid)
    m = apply_sd35_ip_adapter(mmdit, adapter, inputs["features"], SD35IPSettings(end_percent=0.6, attn_mask=mask))

    def sample(model):
        noise = torch.randn(1, 16, 11, 13, generator=torch.Generator().manual_seed(14))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3).cpu()
        return comfy.sample.sample_custom(model, noise, 2.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          dit_conditioning(model, seed=1), dit_conditioning(model, seed=2),
                                          torch.zeros_like(noise), disable_pbar=True)

    plain = sample(mmdit)
    patched = sample(m)
    assert torch.isfinite(patched).all() and (patched - plain).abs().max() > 1e-3
    assert torch.equal(sample(mmdit), plain)


def test_a_block_whose_qk_norm_has_a_zero_gain_recomputes_its_projections_and_still_matches_diffusers(inputs):
    # Block 0 takes the adapter's norms from its own RMS QK-norm; block 1 (a gain at 0 cannot be divided
    # out) recomputes the raw q, k, v: both paths in one forward.
    from stylekit.dit_adapters.mmdit_stream import rms_qk_gains

    model = tiny_mmdit(seed=5)
    with torch.no_grad():
        model.model.diffusion_model.joint_blocks[1].x_block.attn.ln_q.weight[0] = 0.0
    blocks = model.model.diffusion_model.joint_blocks
    assert rms_qk_gains(blocks[0]) is not None and rms_qk_gains(blocks[1]) is None
    file = adapter_file(15)
    adapter = dit_adapter_from_state_dict(file, "ip-adapter.bin")
    ours = core_forward(apply_sd35_ip_adapter(model, adapter, inputs["features"], SD35IPSettings(weight=0.6)), inputs)
    theirs = diffusers_forward(loaded_twin(model), inputs, file, adapter, [0.6, 0.6])
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_other_packs_attention_overrides_set_before_and_after_ours_both_run_chained(mmdit, twin, inputs, monkeypatch):
    # Our term joins the joint attention through the override slot for one block call; overrides other
    # packs put in the slot, before or after our adapter, still run on core's attention and on ours.
    packs = other_packs_overrides()
    base = mmdit.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = packs.before
    file = adapter_file(16)
    adapter = dit_adapter_from_state_dict(file, "ip-adapter.bin")
    m = apply_sd35_ip_adapter(base, adapter, inputs["features"], SD35IPSettings(weight=0.6))
    below = m.model_options["transformer_options"]["optimized_attention_override"]
    assert below is packs.before   # ours did not take the slot
    m.model_options["transformer_options"]["optimized_attention_override"] = packs.chained_after(below)
    ours = core_forward(m, inputs)
    assert packs.calls == {"before": 4, "after": 4}   # per joint block: core's joint attention and our IP attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", packs.reference(sdpa))
    theirs = diffusers_forward(twin, inputs, file, adapter, [0.6, 0.6])
    monkeypatch.undo()
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() < 1e-4 * scale
    without_overrides = core_forward(apply_sd35_ip_adapter(mmdit, adapter, inputs["features"], SD35IPSettings(weight=0.6)), inputs)
    assert (ours - without_overrides).abs().max() > 1e-2 * scale


def test_a_mask_with_a_frame_count_that_fits_no_batch_names_the_input(mmdit, inputs):
    adapter = dit_adapter_from_state_dict(adapter_file(17), "ip-adapter.bin")
    m = apply_sd35_ip_adapter(mmdit, adapter, inputs["features"], SD35IPSettings(attn_mask=torch.ones(3, 8, 8),
                                                                                node="StyleKit IP-Adapter"))
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter: input 'attn_mask': the mask has 3 frames for a batch "
                                         r"of 1 latents; give one mask, or one per latent"):
        last_block_output(m, inputs)
