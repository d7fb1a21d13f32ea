"""The DiT image-prompt terms against diffusers 0.39's processors on the same random weights (fp32).

XLabs Flux: FluxIPAdapterAttnProcessor (and where FluxTransformerBlock adds its output);
InstantX SD3.5: SD3IPAdapterJointAttnProcessor2_0. Our terms are computed from the module's own
projections here; the processors run their own code.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import (FluxAttnProcessor, FluxIPAdapterAttnProcessor,
                                                            FluxPosEmbed, FluxTransformerBlock)

from stylekit.attention.decoupled import ImageKV
from stylekit.attention.dit_image_prompt import flux_ip_attention, joint_ip_attention, merge_heads, rms_norm

HEADS, DIM_HEAD = 2, 16
HIDDEN = HEADS * DIM_HEAD
SIDE, TEXT = 4, 6
IMAGE = SIDE * SIDE


def kernel(q, k, v):
    split = [t.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2) for t in (q, k, v)]
    return merge_heads(F.scaled_dot_product_attention(*split))


def randomise_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == DIM_HEAD else 0.0))
    return module


def flux_rotary(batch_ids_text=TEXT):
    ids = torch.cat([torch.zeros(batch_ids_text, 3),
                     torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(SIDE * 1.0), torch.arange(SIDE * 1.0),
                                                indexing="ij"), -1).reshape(-1, 3)])
    return FluxPosEmbed(10000, [4, 6, 6])(ids)


def flux_block(processor, seed=0):
    block = FluxTransformerBlock(HIDDEN, HEADS, DIM_HEAD)
    randomise_(block, seed)
    block.attn.set_processor(processor)
    return block


def xlabs_processor(cross_dim, tokens, scales, seed=1):
    return randomise_(FluxIPAdapterAttnProcessor(HIDDEN, cross_dim, num_tokens=tokens, scale=scales), seed)


def our_flux_term(attn, processor, hidden, ip_states, scales, masks=None, adapters=None):
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (HEADS, -1))).transpose(1, 2)  # QK-norm, no RoPE
    masks = masks or [None] * len(ip_states)
    adapters = adapters or range(len(ip_states))
    terms = [ImageKV(processor.to_k_ip[a](e), processor.to_v_ip[a](e), w, m)
             for a, e, w, m in zip(adapters, ip_states, scales, masks)]
    return flux_ip_attention(q, terms, kernel)


def _flux_inputs(batch, cross_dim, tokens, seed=2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, IMAGE, HIDDEN, generator=g)
    text = torch.randn(batch, TEXT, HIDDEN, generator=g)
    ips = [torch.randn(batch, t, cross_dim, generator=g) for t in tokens]
    return hidden, text, ips


@pytest.mark.parametrize("tokens,scales", [((4,), [1.0]), ((16,), [0.6]), ((4, 16), [0.7, -0.4])])
def test_flux_term_matches_the_xlabs_processor(tokens, scales):
    cross = 24
    processor = xlabs_processor(cross, tokens, scales)
    block = flux_block(processor)
    hidden, text, ips = _flux_inputs(2, cross, tokens)
    with torch.no_grad():
        _, _, want = processor(block.attn, hidden, text, image_rotary_emb=flux_rotary(), ip_hidden_states=ips)
        got = our_flux_term(block.attn, processor, hidden, ips, scales)
    assert (got - want).abs().max() < 1e-5


def test_flux_term_is_added_after_the_mlp_ungated():
    # The whole diffusers block with the IP processor minus the same block without it is our term.
    cross, tokens, scales = 24, (4,), [0.8]
    processor = xlabs_processor(cross, tokens, scales)
    block = flux_block(processor)
    plain = flux_block(FluxAttnProcessor())
    hidden, text, ips = _flux_inputs(3, cross, tokens, seed=3)
    temb = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(4))
    rotary = flux_rotary()
    with torch.no_grad():
        _, with_ip = block(hidden, text, temb, rotary, {"ip_hidden_states": ips})
        _, without = plain(hidden, text, temb, rotary)
        modulated = block.norm1(hidden, emb=temb)[0]  # the attention's input is the modulated stream
        term = our_flux_term(block.attn, processor, modulated, ips, scales)
    assert (with_ip - (without + term)).abs().max() < 1e-5


def test_flux_mask_gives_exactly_zero_outside_and_the_unmasked_term_inside():
    cross, tokens, scales = 24, (4, 4), [1.0, 0.5]
    processor = xlabs_processor(cross, tokens, scales)
    block = flux_block(processor)
    hidden, _, ips = _flux_inputs(2, cross, tokens)
    left = torch.zeros(1, IMAGE, 1)
    left.view(SIDE, SIDE)[:, : SIDE // 2] = 1
    with torch.no_grad():
        masked = our_flux_term(block.attn, processor, hidden, ips, scales, [left, 1 - left])
        first = our_flux_term(block.attn, processor, hidden, ips[:1], scales[:1])
        second = our_flux_term(block.attn, processor, hidden, ips[1:], scales[1:], adapters=[1])
    inside = left[0, :, 0].bool()
    assert torch.equal(masked[:, inside], first[:, inside])  # the other adapter adds exactly 0 there
    assert torch.equal(masked[:, ~inside], second[:, ~inside])


def test_flux_term_is_none_when_every_weight_is_zero():
    q = torch.randn(1, HEADS, IMAGE, DIM_HEAD)
    kv = torch.randn(1, 4, HIDDEN)
    assert flux_ip_attention(q, [ImageKV(kv, kv, 0.0)], kernel) is None


def sd3_attention(processor, seed=5):
    block = JointTransformerBlock(HIDDEN, HEADS, DIM_HEAD, context_pre_only=False, qk_norm="rms_norm")
    randomise_(block, seed)
    block.attn.set_processor(processor)
    return block.attn


def instantx_processor(scale, temb_dim=20, seed=6):
    return randomise_(SD3IPAdapterJointAttnProcessor2_0(HIDDEN, HIDDEN, DIM_HEAD, temb_dim, scale), seed)


def heads_rms(x, weight):
    return rms_norm(x.unflatten(-1, (HEADS, DIM_HEAD)), weight, 1e-6).flatten(-2)


def ada_layer_norm(e, temb, linear):
    # Written out: LayerNorm without affine (eps 1e-6), then (1 + scale), shift from SiLU(temb); shift first.
    shift, scale = linear(F.silu(temb)).chunk(2, dim=1)
    return F.layer_norm(e, e.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def our_sd3_term(attn, processor, hidden, ip_tokens, temb, weight, mask=None):
    q = heads_rms(attn.to_q(hidden), processor.norm_q.weight)
    k = heads_rms(attn.to_k(hidden), processor.norm_k.weight)
    v = attn.to_v(hidden)
    e = ada_layer_norm(ip_tokens, temb, processor.norm_ip.linear)
    ip_k = heads_rms(processor.to_k_ip(e), processor.norm_ip_k.weight)
    return joint_ip_attention(q, k, v, ip_k, processor.to_v_ip(e), weight, kernel, mask)


@pytest.mark.parametrize("batch,scale", [(1, 0.5), (2, 1.0), (3, -0.3)])
def test_sd3_term_matches_the_instantx_processor(batch, scale):
    processor = instantx_processor(scale)
    attn = sd3_attention(processor)
    g = torch.Generator().manual_seed(7)
    hidden, text = torch.randn(batch, IMAGE, HIDDEN, generator=g), torch.randn(batch, TEXT, HIDDEN, generator=g)
    ip_tokens, temb = torch.randn(batch, 8, HIDDEN, generator=g), torch.randn(batch, 20, generator=g)
    with torch.no_grad():
        with_ip, _ = processor(attn, hidden, text, ip_hidden_states=ip_tokens, temb=temb)
        plain, _ = JointAttnProcessor2_0()(attn, hidden, text)
        term = our_sd3_term(attn, processor, hidden, ip_tokens, temb, scale)
        # Added before the output projection: the difference is the term through to_out's weight.
        assert (with_ip - (plain + term @ attn.to_out[0].weight.T)).abs().max() < 1e-5


def test_sd3_mask_zero_outside_and_weight_zero_is_none():
    processor = instantx_processor(1.0)
    attn = sd3_attention(processor)
    g = torch.Generator().manual_seed(8)
    hidden, ip_tokens, temb = (torch.randn(2, IMAGE, HIDDEN, generator=g), torch.randn(2, 8, HIDDEN, generator=g),
                               torch.randn(2, 20, generator=g))
    top = torch.zeros(1, IMAGE, 1)
    top[:, : IMAGE // 2] = 1
    with torch.no_grad():
        full = our_sd3_term(attn, processor, hidden, ip_tokens, temb, 1.0)
        masked = our_sd3_term(attn, processor, hidden, ip_tokens, temb, 1.0, top)
        assert our_sd3_term(attn, processor, hidden, ip_tokens, temb, 0.0) is None
    assert torch.equal(masked[:, : IMAGE // 2], full[:, : IMAGE // 2])
    assert not masked[:, IMAGE // 2:].any()


def test_rms_norm_matches_torch():
    x, w = torch.randn(3, 5, 16), torch.randn(16)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6), atol=1e-6, rtol=0)


def test_the_split_heads_flux_term_equals_the_merged_one_with_weight_and_mask():
    from stylekit.attention.dit_image_prompt import flux_ip_attention_split

    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, HEADS, IMAGE, DIM_HEAD, generator=g)
    k, v = torch.randn(2, 5, HIDDEN, generator=g), torch.randn(2, 5, HIDDEN, generator=g)
    mask = (torch.arange(IMAGE) % 2).float()[None, :, None]
    split = lambda t: t.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2)
    split_kernel = lambda q, k, v: merge_heads(F.scaled_dot_product_attention(q, k, v))
    ours = flux_ip_attention_split(q, split(k), split(v), 0.7, split_kernel, mask)
    merged = flux_ip_attention(q, [ImageKV(k, v, 0.7, mask)], kernel)
    assert ours.shape == (2, IMAGE, HIDDEN) and torch.allclose(ours, merged, atol=1e-6)
    assert ours[:, ::2].abs().max() == 0 and ours[:, 1::2].abs().max() > 1e-2
    assert flux_ip_attention_split(q, split(k), split(v), 0.0, split_kernel) is None
