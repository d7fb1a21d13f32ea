"""Visual Style Prompting on the real host: default layers, batch robustness, reversibility."""
from __future__ import annotations

import comfy.sample
import pytest
import torch

from stylekit.attention.shared import swapped_attention
from stylekit.host.block_map import block_map
from stylekit.host.layer_select import VSP_DEFAULT, resolve_blocks
from stylekit.patching.visual_style import SwapKVPatch, VisualStyleSettings, install_visual_style_prompting
from stylekit.tests.host.sharing_support import (cond_and_uncond_apart, encode, recording, relative_error,
                                                 sample)

TOLERANCE = 1e-5


def vsp(model, **overrides):
    values = dict(blocks=resolve_blocks(model, VSP_DEFAULT))
    values.update(overrides)
    return install_visual_style_prompting(model, VisualStyleSettings(**values))


@pytest.fixture
def prompts(checkpoint):
    return encode(checkpoint.clip, "a fox, paper cut art"), encode(checkpoint.clip, "")


def test_default_layers_are_the_official_ones_on_sdxl_and_the_matching_block_on_sd15(sd15, sdxl):
    sdxl_layers = set(vsp(sdxl.model).model_options["transformer_options"]["patches_replace"]["attn1"])
    assert sdxl_layers == {("output", n, i) for n in (3, 4, 5) for i in (0, 1)}  # up_blocks.1: 6 attn1 layers
    sd15_layers = set(vsp(sd15.model).model_options["transformer_options"]["patches_replace"]["attn1"])
    assert sd15_layers == {("output", n, 0) for n in (9, 10, 11)}                  # up_blocks.3
    names = {s.diffusers_name for s in block_map(sd15.model) if s.block in resolve_blocks(sd15.model, VSP_DEFAULT)}
    assert names == {f"up_blocks.3.attentions.{i}" for i in range(3)}


def test_only_self_attention_is_swapped(sdxl):
    replaces = vsp(sdxl.model).model_options["transformer_options"]["patches_replace"]
    assert set(replaces) == {"attn1"} and all(isinstance(p, SwapKVPatch) for p in replaces["attn1"].values())


@pytest.mark.parametrize("batch", [2, 3, 8])
def test_results_are_identical_whether_cond_and_uncond_run_together_or_apart(checkpoint, prompts, batch,
                                                                              monkeypatch):
    m = recording(vsp(checkpoint.model, blocks=resolve_blocks(checkpoint.model, "all")))
    together = sample(m, *prompts, batch)
    assert all(sorted(layout) == [0, 1] for layout in m.layouts)
    m.layouts.clear()
    with cond_and_uncond_apart(m, monkeypatch, batch):
        apart = sample(m, *prompts, batch)
    assert m.layouts and all(len(layout) == 1 for layout in m.layouts)
    assert relative_error(apart, together) <= TOLERANCE


def test_it_changes_the_images_but_not_the_reference_image(checkpoint, prompts):
    plain = sample(checkpoint.model, *prompts, 3)
    swapped = sample(vsp(checkpoint.model), *prompts, 3)
    assert torch.equal(swapped[0], plain[0])
    assert relative_error(swapped[1:], plain[1:]) > 1e-3


def test_not_using_it_or_an_empty_window_gives_byte_identical_plain_sampling(checkpoint, prompts):
    before = sample(checkpoint.model, *prompts, 3)
    assert torch.equal(sample(vsp(checkpoint.model, start_percent=1.0, end_percent=1.0), *prompts, 3), before)
    sample(vsp(checkpoint.model), *prompts, 3)
    assert torch.equal(sample(checkpoint.model, *prompts, 3), before)


def test_the_patch_swaps_per_chunk_on_the_real_kernel():
    from comfy.ldm.modules.attention import optimized_attention

    patch = SwapKVPatch(None, type("W", (), {"contains": staticmethod(lambda sigma: True)})())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 16, 64, generator=g) for _ in range(3))
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0])}
    want = swapped_attention(q, k, v, [0, 0, 2, 2], lambda a, b, c, mask: optimized_attention(a, b, c, 8))
    assert torch.equal(patch(q, k, v, extra), want)


def test_first_steps_cfg_replaces_the_guidance_of_the_first_steps_only(sd15):
    positive, negative = encode(sd15.clip, "a fox"), encode(sd15.clip, "")
    off = dict(start_percent=1.0, end_percent=1.0)  # swap off: only the guidance differs
    boosted = vsp(sd15.model, first_steps_cfg=20.0, first_steps=1, **off)
    assert relative_error(sample(boosted, positive, negative, 2, cfg=7.0, steps=1),
                          sample(sd15.model, positive, negative, 2, cfg=20.0, steps=1)) <= 1e-6
    # Two steps: the first at cfg 20, the second at the sampler's 7, as two plain samplings chained.
    latent = torch.zeros(2, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    first = comfy.sample.sample(sd15.model, noise, 2, 20.0, "euler", "normal", positive, negative, latent,
                                last_step=1, disable_pbar=True, seed=3)
    want = comfy.sample.sample(sd15.model, torch.zeros_like(noise), 2, 7.0, "euler", "normal", positive, negative,
                               first, disable_noise=True, start_step=1, disable_pbar=True, seed=3)
    two_steps = sample(boosted, positive, negative, 2, cfg=7.0, steps=2)
    assert relative_error(two_steps, want) <= 1e-6
    assert relative_error(two_steps, sample(sd15.model, positive, negative, 2, cfg=20.0, steps=2)) > 1e-6
