"""The incumbent IP-Adapter pack's controls on our engine, each against the incumbent's formula
written out here from its source (cubiq/ComfyUI_IPAdapter_plus at 9d076a3, IPAdapterPlus.py
ipadapter_execute and CrossAttentionPatch.py ipadapter_attention), on the SD1.5 fixture."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.attention.embeds_scaling import EMBEDS_SCALING
from stylekit.ip_adapter.encode import ImageEmbeds, image_tokens
from stylekit.ip_adapter.files import load_ip_adapter
from stylekit.ip_adapter.weight_types import WEIGHT_TYPES, weight_type_plan
from stylekit.host.block_map import AttentionSite, BlockMap, block_map
from stylekit.patching.ip_adapter import IPAdapterSettings
from stylekit.patching.ip_adapter_controls import (ControlledIPAdapterPatch, IPAdapterControls,
                                                   apply_ip_adapter_controlled)

INCUMBENT_REVISION = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"


def incumbent_weight(weight_type: str, t: int, block_type: str, sdxl: bool, w: float, wc: float) -> float:
    """The weight the incumbent's attention callback ends with at transformer index t (0 = no image)."""
    layers = 11 if sdxl else 16
    table = None
    if weight_type == "style transfer":
        table = {6: w} if sdxl else {i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
    elif weight_type == "composition":
        table = {3: w} if sdxl else {4: w * 0.25, 5: w}
    elif weight_type == "strong style transfer":
        table = ({i: w for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)} if sdxl
                 else {i: w for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)})
    elif weight_type in ("style and composition", "style transfer precise"):
        c = wc if weight_type == "style and composition" else w
        table = {3: c, 6: w} if sdxl else {**{i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, 4: c * 0.25, 5: c}
    elif weight_type == "strong style and composition":
        table = ({**{i: w for i in range(11)}, 3: wc} if sdxl else {**{i: w for i in range(16)}, 4: wc, 5: wc})
    elif weight_type == "composition precise":
        if sdxl:
            table = {i: w * .1 for i in range(11)} | {3: w, 6: w}
        else:
            table = {i: w for i in range(16)} | {4: w * 0.25, 5: w, 6: w * .1, 7: w * .1, 8: w * .1}
    if table is not None:
        return table.get(t, 0.0)
    if weight_type == "ease in":
        return w * (0.05 + 0.95 * (1 - t / layers))
    if weight_type == "ease out":
        return w * (0.05 + 0.95 * (t / layers))
    if weight_type == "ease in-out":
        return w * (0.05 + 0.95 * (1 - abs(t - (layers / 2)) / (layers / 2)))
    if weight_type == "reverse in-out":
        return w * (0.05 + 0.95 * (abs(t - (layers / 2)) / (layers / 2)))
    if (weight_type, block_type) in (("weak input", "input"), ("weak middle", "middle"), ("weak output", "output")):
        return w * 0.2
    if weight_type == "strong middle" and block_type in ("input", "output"):
        return w * 0.2
    return w


SDXL_SITES = [  # (ComfyUI id, diffusers name, depth, channels, first IP-Adapter key), forward order
    (("input", 4), "down_blocks.1.attentions.0", 2, 640, 1), (("input", 5), "down_blocks.1.attentions.1", 2, 640, 5),
    (("input", 7), "down_blocks.2.attentions.0", 10, 1280, 9), (("input", 8), "down_blocks.2.attentions.1", 10, 1280, 29),
    (("middle", 0), "mid_block.attentions.0", 10, 1280, 121),
    (("output", 0), "up_blocks.0.attentions.0", 10, 1280, 49), (("output", 1), "up_blocks.0.attentions.1", 10, 1280, 69),
    (("output", 2), "up_blocks.0.attentions.2", 10, 1280, 89), (("output", 3), "up_blocks.1.attentions.0", 2, 640, 109),
    (("output", 4), "up_blocks.1.attentions.1", 2, 640, 113), (("output", 5), "up_blocks.1.attentions.2", 2, 640, 117),
]


def sdxl_map() -> BlockMap:
    """SDXL's block map as DESIGN §2 tables it (tests/host/test_block_map.py checks it on the fixture)."""
    return BlockMap(tuple(AttentionSite(block, i, depth, ch, ch // 64, 64, 2048, name,
                                        tuple(first + 2 * j for j in range(depth)))
                          for i, (block, name, depth, ch, first) in enumerate(SDXL_SITES)))


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_weight_types_give_the_incumbents_weight_on_every_layer_it_patches(sd15, weight_type):
    for bm, sdxl in ((block_map(sd15.model), False), (sdxl_map(), True)):
        assert len(bm) == (11 if sdxl else 16)
        ours = weight_type_plan(bm, weight_type, 0.8, 0.6 if "composition" in weight_type and "precise" not in weight_type else None)
        like_incumbent = weight_type_plan(bm, weight_type, 0.8, 0.6 if "composition" in weight_type and "precise" not in weight_type else None,
                                          incumbent_middle=True)
        wc = 0.6 if "composition" in weight_type and "precise" not in weight_type else 0.8
        for site in bm:
            expected = incumbent_weight(weight_type, site.transformer_index, site.block[0], sdxl, 0.8, wc)
            for layer in site.layers():
                if site.block[0] == "middle":
                    # The incumbent registers ("middle", 1), which core never calls: no image there.
                    assert like_incumbent.weights[layer] == 0.0
                    assert ours.weights[layer] == pytest.approx(expected)  # ours patches it with the formula's value
                else:
                    assert ours.weights[layer] == pytest.approx(expected), (weight_type, sdxl, site.block)
                    assert like_incumbent.weights[layer] == ours.weights[layer]


def test_precise_types_swap_the_image_prompt_where_the_incumbent_does(sd15):
    for bm, comp in ((block_map(sd15.model), {4, 5}), (sdxl_map(), {3})):
        style = weight_type_plan(bm, "style transfer precise")
        assert {l for l in style.swapped} == {l for s in bm if s.transformer_index in comp for l in s.layers()}
        composition = weight_type_plan(bm, "composition precise", incumbent_middle=True)
        assert composition.swapped == {l for s in bm if s.transformer_index not in comp and s.block[0] != "middle"
                                       for l in s.layers()}


# --- the patch on the fixture: embeds scaling, precise swap, per-frame weights and unfold ----------

def reference_attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (x.reshape(x.shape[0], -1, heads, d).transpose(1, 2).double() for x in (q, k, v))
    kh, vh = kh.expand(b, -1, -1, -1), vh.expand(b, -1, -1, -1)
    out = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh
    return out.transpose(1, 2).reshape(b, n, c)


def incumbent_image_term(q, ip_k, ip_v, weight, embeds_scaling, heads):
    """CrossAttentionPatch.ipadapter_attention's image term, as its source writes it."""
    if embeds_scaling == "K+mean(V) w/ C penalty":
        scaling = float(ip_k.shape[2]) / 1280.0
        weight = weight * scaling
        ip_k = ip_k * weight
        ip_v_mean = torch.mean(ip_v, dim=1, keepdim=True)
        ip_v = (ip_v - ip_v_mean) + ip_v_mean * weight
        return reference_attention(q, ip_k, ip_v, heads)
    if embeds_scaling == "K+V w/ C penalty":
        scaling = float(ip_k.shape[2]) / 1280.0
        weight = weight * scaling
        return reference_attention(q, ip_k * weight, ip_v * weight, heads)
    if embeds_scaling == "K+V":
        return reference_attention(q, ip_k * weight, ip_v * weight, heads)
    return reference_attention(q, ip_k, ip_v, heads) * weight


def _setup(sd15, count=1, seed=0):
    adapter = load_ip_adapter("ip-adapter_sd15.safetensors")
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(count, adapter.clip_width, generator=g)
    embeds = ImageEmbeds(cond=cond, uncond=torch.zeros_like(cond), source=adapter.clip_input)
    return adapter, embeds


def _patch(model, layer) -> ControlledIPAdapterPatch:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"][layer]


def _call(patch, site, rows, flags=(0, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    c = site.channels
    q = torch.randn(rows * len(flags), 16, c, generator=g)
    k = torch.randn(rows * len(flags), 77, c, generator=g)
    v = torch.randn(rows * len(flags), 77, c, generator=g)
    opts = {"n_heads": site.heads, "cond_or_uncond": list(flags), "original_shape": [rows, 4, 4, 4]}
    return q, k, v, patch(q, k, v, opts)


def _kv(adapter, tokens, key):
    to_k, to_v = adapter.kv[key]
    return tokens @ to_k.float().T, tokens @ to_v.float().T


@pytest.mark.parametrize("embeds_scaling", EMBEDS_SCALING)
def test_embeds_scaling_matches_the_incumbents_image_term(sd15, embeds_scaling):
    adapter, embeds = _setup(sd15)
    model = apply_ip_adapter_controlled(sd15.model, adapter, embeds, IPAdapterSettings(weight=0.7),
                                        IPAdapterControls(embeds_scaling=embeds_scaling))
    tokens = image_tokens(adapter, embeds)
    for site in block_map(sd15.model):
        if site.block not in (("input", 1), ("output", 8)):   # 320 and 640 channels: the penalty differs
            continue
        q, k, v, got = _call(_patch(model, site.layers()[0]), site, rows=2)
        kc, vc = _kv(adapter, tokens.cond, site.ip_adapter_keys[0])
        ku, vu = _kv(adapter, tokens.uncond, site.ip_adapter_keys[0])
        ip_k = torch.cat([kc.expand(2, -1, -1), ku.expand(2, -1, -1)])
        ip_v = torch.cat([vc.expand(2, -1, -1), vu.expand(2, -1, -1)])
        want = reference_attention(q, k, v, site.heads) + incumbent_image_term(q, ip_k, ip_v, 0.7, embeds_scaling,
                                                                                site.heads)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_style_transfer_precise_moves_the_image_to_the_uncond_rows_at_the_composition_layers(sd15):
    adapter, embeds = _setup(sd15)
    model = apply_ip_adapter_controlled(sd15.model, adapter, embeds, IPAdapterSettings(weight=1.0),
                                        IPAdapterControls(weight_type="style transfer precise"))
    tokens = image_tokens(adapter, embeds)
    site = block_map(sd15.model).site(("input", 8))   # transformer index 5
    q, k, v, got = _call(_patch(model, site.layers()[0]), site, rows=1, flags=(0, 1))
    kc, vc = _kv(adapter, tokens.cond, site.ip_adapter_keys[0])
    # incumbent: uncond = cond; cond = cond * 0 (zero tokens: zero keys and values)
    ip_k = torch.cat([kc * 0, kc])
    ip_v = torch.cat([vc * 0, vc])
    want = reference_attention(q, k, v, site.heads) + incumbent_image_term(q, ip_k, ip_v, 1.0, "V only", site.heads)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got[0].double(), reference_attention(q, k, v, site.heads)[0], atol=1e-4)


def test_per_frame_weights_and_unfold_give_each_latent_its_reference_and_weight(sd15):
    adapter, embeds = _setup(sd15, count=2)
    frames = (0.5, 1.0, 0.25)  # three latents, two references: the last reference repeats
    model = apply_ip_adapter_controlled(sd15.model, adapter, embeds, IPAdapterSettings(weight=1.0),
                                        IPAdapterControls(weight_type="ease out", frame_weights=frames,
                                                          unfold_batch=True, embeds_scaling="K+V"))
    bm = block_map(sd15.model)
    site = bm.site(("output", 4))
    per_image = [image_tokens(adapter, ImageEmbeds(embeds.cond[i:i + 1], embeds.uncond[i:i + 1], embeds.source))
                 for i in range(2)]
    q, k, v, got = _call(_patch(model, site.layers()[0]), site, rows=3, flags=(1, 0))
    curve = [incumbent_weight("ease out", site.transformer_index, "output", False, f, f) for f in frames]
    ks, vs = [], []
    for which in ("uncond", "cond"):
        for row in range(3):
            kk, vv = _kv(adapter, getattr(per_image[min(row, 1)], which), site.ip_adapter_keys[0])
            ks.append(kk)
            vs.append(vv)
    weight = torch.tensor(curve * 2, dtype=torch.float64)[:, None, None]
    want = reference_attention(q, k, v, site.heads) + incumbent_image_term(
        q, torch.cat(ks).double(), torch.cat(vs).double(), weight, "K+V", site.heads)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_frame_weights_text_beyond_its_bound_is_refused_before_it_is_split():
    from stylekit.nodes.ip_adapter_controls import MAX_FRAME_WEIGHTS_CHARS, parse_frame_weights

    assert parse_frame_weights("StyleKit IP-Adapter Advanced", "1.0, 0.5") == (1.0, 0.5)
    with pytest.raises(ValueError, match=f"input 'frame_weights'.*limit of {MAX_FRAME_WEIGHTS_CHARS}"):
        parse_frame_weights("StyleKit IP-Adapter Advanced", "1," * MAX_FRAME_WEIGHTS_CHARS)
