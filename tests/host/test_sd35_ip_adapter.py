"""The InstantX SD3.5 IP-Adapter patch on core's MMDiT equals diffusers' SD3Transformer2DModel with
SD3IPAdapterJointAttnProcessor2_0 on the same weights and per-block scales (tiny SD3.5-Large layout:
depth 2, RMS QK-norm; resampler at small widths), and stacks over another pack's block replace."""
from __future__ import annotations

import pytest
import torch

from stylekit.dit_adapters.files import dit_adapter_from_state_dict
from stylekit.host.block_weights import CUSTOM
from stylekit.patching.sd35_ip_adapter import SD35IPSettings, apply_sd35_ip_adapter
from stylekit.tests.fixtures.dit_ip_adapters import instantx_sd35_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict
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


def core_forward(m, inputs):
    options = {**m.model_options["transformer_options"], "sigmas": torch.tensor([SIGMA])}
    with torch.no_grad():
        return m.model.diffusion_model(inputs["x"], torch.tensor([SIGMA * 1000]), inputs["context"], y=inputs["y"],
                                       transformer_options=options)


@pytest.fixture(scope="module")
def twin(mmdit):
    from stylekit.tests.support.diffusers_dit import diffusers_twin_and_key_map

    model, key_map = diffusers_twin_and_key_map(mmdit)
    sd = mmdit.model.diffusion_model.state_dict()
    converted = {}
    for key, source in key_map.items():
        if isinstance(source, str):
            source = (source, None)
        name, narrow, *convert = source
        if name not in sd:
            continue
        value = sd[name] if narrow is None else sd[name].narrow(*narrow)
        converted[key] = convert[0](value) if convert else value
    model = model.to_empty(device="cpu")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_forward(twin, inputs, file=None, adapter=None, scales=()):
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

    kwargs = None
    for i, block in enumerate(twin.transformer_blocks):
        if file is None:
            block.attn.set_processor(JointAttnProcessor2_0())
            continue
        proc = SD3IPAdapterJointAttnProcessor2_0(128, 128, 64, 128, scales[i])
        proc.load_state_dict({k.split(".", 1)[1]: v for k, v in file["ip_adapter"].items() if k.startswith(f"{i}.")})
        block.attn.set_processor(proc)
    if file is not None:
        tokens, temb = adapter.resampler(inputs["features"], torch.tensor([SIGMA * 1000]))
        kwargs = {"ip_hidden_states": tokens, "temb": temb}
    with torch.no_grad():
        return twin(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
                    timestep=torch.tensor([SIGMA * 1000]), joint_attention_kwargs=kwargs, return_dict=False)[0]


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


class Recorder:
    """A block replace of 'another pack' at the last joint block: records the x stream the block returns."""

    def __init__(self, previous=None):
        self.previous, self.img = previous, None

    def __call__(self, args, extra):
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        self.img = out["img"].clone()
        return out


def last_block_output(m, inputs) -> torch.Tensor:
    """x stream out of joint block 1, through BaseModel.apply_model (runs the APPLY_MODEL wrapper that
    records the token grid for masks)."""
    m = m.clone()
    previous = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get(("double_block", 1))
    recorder = Recorder(previous)
    m.set_model_patch_replace(recorder, "dit", "double_block", 1)
    options = {**m.model_options["transformer_options"], "sigmas": torch.tensor([SIGMA]), "wrappers": m.wrappers}
    with torch.no_grad():
        m.model.apply_model(inputs["x"], torch.tensor([SIGMA]), c_crossattn=inputs["context"], y=inputs["y"],
                            transformer_options=options)
    return recorder.img


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
