"""The joint shared-attention math under core's real Flux attention call (tiny core-class Flux).

A test-local attention override (the product's chained override is the next step, on the DiT
site map) feeds attention/joint_shared.py what core's Flux blocks hand the override: post-RoPE
q, k, v [B, H, L, D] with skip_reshape, core's own kernel and mask handling. The sampled reference
row equals the unpatched model's, the other rows change, and the result is the same whether core
runs cond and uncond together or apart.
"""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import pytest
import torch

from stylekit.attention.joint_shared import joint_shared_attention, joint_swapped_attention
from stylekit.tests.host.sharing_support import cond_and_uncond_apart
from stylekit.tests.support.tiny_dits import tiny_flux, tiny_flux_conditioning

SIDE = 8                       # latent side; patch 2 -> 4×4 = 16 image tokens
IMAGE_TOKENS = (SIDE // 2) ** 2


def chunk_references(cond_or_uncond, batch):
    """Each row's reference: the first row of its cond/uncond chunk."""
    per_chunk = batch // len(cond_or_uncond)
    return [i - i % per_chunk for i in range(batch)]


def shared_override(calls, method):
    def override(func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options", {})
        image = slice(q.shape[2] - IMAGE_TOKENS, q.shape[2])  # text then image, nothing after
        refs = chunk_references(options["cond_or_uncond"], q.shape[0])
        calls.append((options.get("block_type"), options.get("block_index"), refs))
        kernel = lambda q_, k_, v_, mask: func(q_, k_, v_, heads, *args, **{**kwargs, "mask": mask})
        if method == "shared":
            return joint_shared_attention(q, k, v, refs, image, kernel, score_shift=0.5)
        return joint_swapped_attention(q, k, v, refs, image, kernel)
    return override


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=1)


def sample(model, batch=3, cfg=2.0):
    conds = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    noise = torch.randn(batch, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3).cpu()
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, *conds,
                                      torch.zeros_like(noise), disable_pbar=True, seed=0)


@pytest.mark.parametrize("method", ["shared", "swapped"])
def test_the_reference_row_is_the_unpatched_models_and_targets_change(flux, method, monkeypatch):
    plain = sample(flux)
    calls = []
    m = flux.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = shared_override(calls, method)
    together = sample(m)
    assert {(c[0], c[1]) for c in calls} == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    assert any(len(c[2]) == 6 for c in calls)  # cond and uncond in one pass: references 0 and 3
    scale = plain.abs().max()
    assert (together[0] - plain[0]).abs().max() < 1e-6 * scale
    assert (together[1:] - plain[1:]).abs().max() > 1e-2 * scale
    calls.clear()
    with cond_and_uncond_apart(m, monkeypatch, 3):
        apart = sample(m)
    assert all(c[2] == [0, 0, 0] for c in calls)
    assert (apart - together).abs().max() < 1e-5 * scale  # float summation order only


def test_core_kernels_take_both_layouts_and_the_reference_bias():
    # Core's MMDiT calls optimized_attention on [B, L, H·D] with `heads`; Flux on [B, H, L, D]
    # with skip_reshape. Both give the fp64 formula with the score shift as core's additive mask.
    from comfy.ldm.modules.attention import optimized_attention

    from stylekit.attention.joint_shared import image_span
    from stylekit.tests.unit.test_joint_shared_attention_math import HEADS, IMAGE, TEXT, _as_heads, _qkv, reference_shared

    refs = [0, 0, 0, 3, 3, 3]
    q, k, v = _qkv(6, 12)
    image = image_span(TEXT, IMAGE)
    heads_kernel = lambda q_, k_, v_, mask: optimized_attention(q_, k_, v_, HEADS, skip_reshape=True, mask=mask)
    merged_kernel = lambda q_, k_, v_, mask: optimized_attention(q_, k_, v_, HEADS, mask=mask)
    split = joint_shared_attention(q, k, v, refs, image, heads_kernel, score_shift=0.7)
    merged = joint_shared_attention(*(t.transpose(1, 2).flatten(2) for t in (q, k, v)), refs, image, merged_kernel,
                                    score_shift=0.7)
    want = reference_shared(q, k, v, refs, image, shift=0.7)
    assert (_as_heads(split).double() - want).abs().max() < 1e-5
    assert (_as_heads(merged).double() - want).abs().max() < 1e-5
