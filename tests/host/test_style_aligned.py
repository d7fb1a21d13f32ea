"""StyleAligned on the real host: where it patches, batch robustness, reversibility, the layer math."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.attention.shared import shared_attention
from stylekit.patching.attention_replace import installed_replace
from stylekit.host.block_map import block_map
from stylekit.host.layer_select import ALL, UP_ONLY, resolve_blocks
from stylekit.patching.shared_norm import is_shared_norm
from stylekit.patching.style_aligned import SharedAttentionPatch, StyleAlignedSettings, install_style_aligned
from stylekit.tests.host.sharing_support import (cond_and_uncond_apart, encode, recording, relative_error,
                                                 sample)

TOLERANCE = 1e-5  # relative to the largest value; the tiny random models reach latents of ~300


def settings_for(model, **overrides) -> StyleAlignedSettings:
    values = dict(blocks=resolve_blocks(model, ALL), share_group_norm=True, adain_values=True,
                  shared_score_shift=math.log(2))
    values.update(overrides)
    return StyleAlignedSettings(**values)


@pytest.fixture
def prompts(checkpoint):
    return encode(checkpoint.clip, "a lighthouse, watercolor"), encode(checkpoint.clip, "blurry")


@pytest.mark.parametrize("batch", [2, 3, 8])
def test_results_are_identical_whether_cond_and_uncond_run_together_or_apart(checkpoint, prompts, batch,
                                                                              monkeypatch):
    m = recording(install_style_aligned(checkpoint.model, settings_for(checkpoint.model)))
    together = sample(m, *prompts, batch)
    assert m.layouts and all(sorted(layout) == [0, 1] for layout in m.layouts)
    m.layouts.clear()
    with cond_and_uncond_apart(m, monkeypatch, batch):
        apart = sample(m, *prompts, batch)
    assert m.layouts and all(len(layout) == 1 for layout in m.layouts)
    assert relative_error(apart, together) <= TOLERANCE


def test_a_single_cond_pass_equals_the_cond_chunk_of_a_joint_pass(checkpoint, prompts):
    # cfg 1: core skips uncond ([0] alone); with disable_cfg1_optimization it runs [1, 0] and the
    # reference of the cond chunk is then the chunk's first row, not the batch's.
    m = install_style_aligned(checkpoint.model, settings_for(checkpoint.model))
    alone = recording(m)
    single = sample(alone, *prompts, 4, cfg=1.0)
    assert all(layout == [0] for layout in alone.layouts)
    joint = recording(m)
    joint.model_options["disable_cfg1_optimization"] = True
    both = sample(joint, *prompts, 4, cfg=1.0)
    assert all(len(layout) == 2 for layout in joint.layouts)
    assert relative_error(both, single) <= TOLERANCE


def test_it_changes_the_images_but_not_the_reference_image(checkpoint, prompts):
    plain = sample(checkpoint.model, *prompts, 3)
    shared = sample(install_style_aligned(checkpoint.model, settings_for(checkpoint.model)), *prompts, 3)
    assert relative_error(shared[0], plain[0]) <= TOLERANCE      # row 0 stays plain, norms included
    assert relative_error(shared[1:], plain[1:]) > 1e-2


def test_not_using_it_or_an_empty_window_gives_byte_identical_plain_sampling(checkpoint, prompts):
    before = sample(checkpoint.model, *prompts, 3)
    off = install_style_aligned(checkpoint.model, settings_for(checkpoint.model, start_percent=1.0, end_percent=1.0))
    assert torch.equal(sample(off, *prompts, 3), before)
    sample(install_style_aligned(checkpoint.model, settings_for(checkpoint.model)), *prompts, 3)
    assert torch.equal(sample(checkpoint.model, *prompts, 3), before)


def test_the_input_model_is_untouched_and_norms_return_after_sampling(checkpoint, prompts):
    model = checkpoint.model
    m = install_style_aligned(model, settings_for(model))
    assert all(installed_replace(model, "attn1", layer) is None for layer in block_map(model).layers())
    assert not model.object_patches and len(m.object_patches) == sum(
        isinstance(x, torch.nn.GroupNorm) for x in model.model.diffusion_model.modules())
    sample(m, *prompts, 2)
    sample(model, *prompts, 2)  # loading another clone restores the originals
    assert not any(is_shared_norm(x) for x in model.model.diffusion_model.modules())


def test_parameter_names_stay_the_same_while_shared_norms_are_in(checkpoint, prompts):
    # Weight patches (LoRA) and low-VRAM loading address norms by these names.
    import comfy.model_management

    model = checkpoint.model
    before = sorted(name for name, _ in model.model.named_parameters())
    m = install_style_aligned(model, settings_for(model))
    comfy.model_management.load_model_gpu(m)
    assert any(is_shared_norm(x) for x in model.model.diffusion_model.modules())
    assert sorted(name for name, _ in model.model.named_parameters()) == before
    comfy.model_management.load_model_gpu(model)


def test_only_self_attention_is_patched_in_the_chosen_blocks(checkpoint):
    model = checkpoint.model
    bmap = block_map(model)
    m = install_style_aligned(model, settings_for(model, blocks=resolve_blocks(model, UP_ONLY)))
    replaces = m.model_options["transformer_options"]["patches_replace"]
    assert "attn2" not in replaces
    assert set(replaces["attn1"]) == {layer for s in bmap if s.block[0] == "output" for layer in s.layers()}
    assert all(isinstance(p, SharedAttentionPatch) for p in replaces["attn1"].values())


def test_every_installed_patch_is_called_in_one_forward_pass(checkpoint, prompts):
    model = checkpoint.model
    m = install_style_aligned(model, settings_for(model))
    hits = set()
    for layer, patch in m.model_options["transformer_options"]["patches_replace"]["attn1"].items():
        def spy(q, k, v, extra_options, layer=layer, inner=patch.__class__.__call__, patch=patch):
            hits.add(layer)
            return inner(patch, q, k, v, extra_options)
        m.set_model_attn1_replace(spy, *layer)
    sample(m, *prompts, 2, steps=1)
    assert hits == set(block_map(model).layers())


def test_only_self_level_leaves_a_regular_fraction_unshared(sdxl):
    model = sdxl.model
    m = install_style_aligned(model, settings_for(model, only_self_level=0.5))
    assert len(m.model_options["transformer_options"]["patches_replace"]["attn1"]) == 35  # 70 layers, every other


def test_the_patch_computes_the_layer_formula_on_the_real_kernel(checkpoint):
    # The patch only routes rows: what it returns at a layer is attention/shared.py's result for
    # the chunk layout ComfyUI gives ([1, 0]: uncond chunk first).
    from comfy.ldm.modules.attention import optimized_attention

    s = settings_for(checkpoint.model)
    patch = SharedAttentionPatch(None, s, type("W", (), {"contains": staticmethod(lambda sigma: True)})())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 16, 64, generator=g) for _ in range(3))
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0])}
    want = shared_attention(q, k, v, [0, 0, 0, 3, 3, 3], lambda a, b, c, mask: optimized_attention(a, b, c, 8, mask=mask),
                            adain_values=True, score_shift=math.log(2))
    assert torch.equal(patch(q, k, v, extra), want)


def test_a_shift_on_top_of_another_self_attention_patch_is_refused_clearly(sd15):
    m = sd15.model.clone()
    m.set_model_attn1_replace(lambda q, k, v, extra: q, "output", 9)
    with pytest.raises(ValueError, match="set shared_score_shift to 0"):
        install_style_aligned(m, settings_for(sd15.model))
    install_style_aligned(m, settings_for(sd15.model, shared_score_shift=0.0))  # composes without a bias


@pytest.mark.parametrize("level", [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_only_self_level_follows_the_official_switch_vector(sdxl, level):
    from stylekit.host.layer_select import unshared_by_level

    # The official rule (sa_handler._get_switch_vec), restated: over the attn1 layers in diffusers'
    # processor order, every (total // k)-th layer is switched off, k = int(level · total); above
    # 0.5 the complement of the rule for 1 − level.
    bmap = block_map(sdxl.model)
    by_processor = {(key - 1) // 2: layer for s in bmap for key, layer in zip(s.ip_adapter_keys, s.layers())}
    total = len(by_processor)
    flip = level > 0.5
    k = int((1 - level if flip else level) * total)
    off = [True] * total if level == 1.0 else [(i % (total // k) == 0) != flip for i in range(total)]
    assert unshared_by_level(bmap, level) == {by_processor[i] for i in range(total) if off[i]}
