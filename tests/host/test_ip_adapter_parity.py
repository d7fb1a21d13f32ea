"""Parity with diffusers 0.39 on the same weights: the fixture UNet in both libraries, the same
IP-Adapter file loaded by ours and by diffusers' own `load_ip_adapter`, scales set through
diffusers' own `set_ip_adapter_scale` block dicts. One patched attention layer and the whole
UNet's noise prediction must agree within 1e-4 (fp32), and a block selection shifted by one must
not (so the comparison can fail).
"""
from __future__ import annotations

import pytest
import torch
from diffusers.loaders.ip_adapter import IPAdapterMixin

from stylekit.ip_adapter.encode import ImageEmbeds, image_tokens
from stylekit.ip_adapter.files import read_ip_adapter
from stylekit.ip_adapter.model import IMAGE_EMBEDS, PENULTIMATE
from stylekit.host.block_weights import CUSTOM
from stylekit.patching.ip_adapter import IPAdapterSettings, apply_ip_adapter
from stylekit.tests.fixtures.registry import (IP_ADAPTER_FULL_FACE_SD15, IP_ADAPTER_PLUS_SD15,
                                              IP_ADAPTER_PLUS_SDXL_VIT_H, IP_ADAPTER_SD15, IP_ADAPTER_SDXL_VIT_H)
from stylekit.tests.support.diffusers_unet import diffusers_twin, sdxl_adm

TOLERANCE = 1e-4

# Distinct values per attentions.j so that any misplaced block changes the result.
SCALES = {
    "sd15": {"down": {"block_0": [0.0, 0.4], "block_2": [0.0, 1.0]}, "mid": 0.6,
             "up": {"block_1": [0.3, 0.0, 1.2], "block_3": 0.8}},
    "sdxl": {"down": {"block_2": [0.0, 0.9]}, "mid": 0.4, "up": {"block_0": [0.0, 1.0, 0.0], "block_1": [0.5, 0.0, 0.7]}},
}

class _Pipeline(IPAdapterMixin):
    """The smallest host for diffusers' own IP-Adapter loading and scale logic: a UNet."""

    def __init__(self, unet):
        self.unet = unet


@pytest.fixture(scope="module")
def twins():
    """One diffusers twin per topology for this module, freed after it (the server layer needs the memory)."""
    built: dict[str, torch.nn.Module] = {}

    def twin(name: str, checkpoint) -> torch.nn.Module:
        if name not in built:
            built[name] = diffusers_twin(checkpoint.model)
        return built[name]

    yield twin
    built.clear()


def _reference(twin, fixtures, scale) -> _Pipeline:
    """diffusers with the same files loaded by its own loader and scales set by its own logic."""
    pipe = _Pipeline(twin)
    pipe.load_ip_adapter([str(f.linked_path().parent) for f in fixtures], subfolder=["" for _ in fixtures],
                         weight_name=[f.filename for f in fixtures], image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe


def _embeds(adapter, seed: int) -> ImageEmbeds:
    """Seeded CLIP features of the width and kind the adapter reads, cond and a distinct uncond."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, adapter.clip_width) if adapter.clip_input == IMAGE_EMBEDS else (1, 257, adapter.clip_width)
    return ImageEmbeds(cond=torch.randn(shape, generator=g), uncond=torch.randn(shape, generator=g) * 0.1,
                       source=adapter.clip_input)


def _diffusers_image_embeds(embeds: ImageEmbeds) -> torch.Tensor:
    """diffusers' CFG batch layout: [uncond, cond] rows, one image each: [2, 1, ...]."""
    return torch.cat([embeds.uncond, embeds.cond])[:, None]


def _inputs(checkpoint, twin, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 400.0)
    context = torch.randn(batch, 77, checkpoint.model.model.model_config.unet_config["context_dim"], generator=g)
    ours, theirs = {}, {}
    if checkpoint.model.model.adm_channels:
        text = torch.randn(batch, 1280, generator=g)
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).expand(batch, -1)
        ours["y"] = sdxl_adm(twin, text, ids)
        theirs = {"text_embeds": text, "time_ids": ids}
    return x, t, context, ours, theirs


def _ours(model_patcher, x, t, context, extra, cond_or_uncond):
    import comfy.model_management

    comfy.model_management.load_model_gpu(model_patcher)
    options = dict(model_patcher.model_options["transformer_options"], cond_or_uncond=cond_or_uncond)
    with torch.no_grad():
        return model_patcher.model.diffusion_model(x, t, context=context, transformer_options=options, **extra)


def _theirs(twin, x, t, context, added, image_embeds: list[torch.Tensor]):
    with torch.no_grad():
        return twin(x, t, encoder_hidden_states=context,
                    added_cond_kwargs=dict(added, image_embeds=image_embeds)).sample


def _patched(checkpoint, adapters_and_embeds, scales):
    m = checkpoint.model
    for (adapter, embeds), scale in zip(adapters_and_embeds, scales):
        settings = IPAdapterSettings(weight=1.0, blocks=CUSTOM, block_weights=scale)
        m = apply_ip_adapter(m, adapter, image_tokens(adapter, embeds), settings)
    return m


CASES = [("sd15", IP_ADAPTER_SD15), ("sd15", IP_ADAPTER_PLUS_SD15), ("sd15", IP_ADAPTER_FULL_FACE_SD15),
         ("sdxl", IP_ADAPTER_SDXL_VIT_H), ("sdxl", IP_ADAPTER_PLUS_SDXL_VIT_H)]


@pytest.mark.parametrize("model_name,fixture", CASES, ids=[f.filename for _, f in CASES])
def test_noise_prediction_matches_diffusers_with_its_block_dict(request, twins, model_name, fixture):
    checkpoint = request.getfixturevalue(model_name)
    twin = twins(model_name, checkpoint)
    adapter = read_ip_adapter(str(fixture.linked_path()))
    embeds = _embeds(adapter, seed=1)
    _reference(twin, [fixture], SCALES[model_name])
    x, t, context, ours_extra, added = _inputs(checkpoint, twin)

    ours = _ours(_patched(checkpoint, [(adapter, embeds)], [SCALES[model_name]]), x, t, context, ours_extra, [1, 0])
    theirs = _theirs(twin, x, t, context, added, [_diffusers_image_embeds(embeds)])
    plain = _ours(checkpoint.model, x, t, context, ours_extra, [1, 0])

    assert (ours - theirs).abs().max().item() < TOLERANCE
    assert (ours - plain).abs().max().item() > 100 * TOLERANCE  # the adapter does change the prediction


@pytest.mark.parametrize("model_name,fixture,layer,diffusers_path", [
    ("sd15", IP_ADAPTER_PLUS_SD15, ("middle", 0, 0), "mid_block.attentions.0.transformer_blocks.0.attn2"),
    ("sdxl", IP_ADAPTER_SDXL_VIT_H, ("output", 1, 3), "up_blocks.0.attentions.1.transformer_blocks.3.attn2"),
], ids=["sd15-plus-middle", "sdxl-base-output1.3"])
def test_one_patched_attention_layer_matches_the_diffusers_processor(request, twins, model_name, fixture, layer,
                                                                     diffusers_path):
    checkpoint = request.getfixturevalue(model_name)
    twin = twins(model_name, checkpoint)
    adapter = read_ip_adapter(str(fixture.linked_path()))
    embeds = _embeds(adapter, seed=2)
    pipe = _reference(twin, [fixture], 0.75)
    m = _patched(checkpoint, [(adapter, embeds)], [0.75])

    # The same tokens on both sides: our projection against diffusers' converted one.
    tokens = image_tokens(adapter, embeds)
    (their_tokens,) = twin.encoder_hid_proj([_diffusers_image_embeds(embeds)])  # [2, 1, T, C]
    assert (torch.cat([tokens.uncond, tokens.cond]) - their_tokens[:, 0]).abs().max().item() < TOLERANCE

    unet = checkpoint.model.model.diffusion_model
    blocks = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}
    site_block = blocks[layer[0]][layer[1] if layer[0] != "middle" else 0]
    transformer = next(mod for mod in site_block if type(mod).__name__ == "SpatialTransformer")
    attn2 = transformer.transformer_blocks[layer[2]].attn2
    patch = m.model_options["transformer_options"]["patches_replace"]["attn2"][layer]

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 64, attn2.to_q.in_features, generator=g)
    context = torch.randn(2, 77, attn2.to_k.in_features, generator=g)
    extra = {"n_heads": transformer.transformer_blocks[layer[2]].n_heads, "cond_or_uncond": [1, 0],
             "original_shape": [2, 4, 8, 8]}
    with torch.no_grad():
        ours = attn2.to_out(patch(attn2.to_q(hidden), attn2.to_k(context), attn2.to_v(context), extra))
        their_attn = pipe.unet.get_submodule(diffusers_path)
        theirs = their_attn(hidden, encoder_hidden_states=(context, [their_tokens]))
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_two_stacked_adapters_match_diffusers_multi_adapter_processor(twins, sd15):
    twin = twins("sd15", sd15)
    fixtures = [IP_ADAPTER_SD15, IP_ADAPTER_PLUS_SD15]
    adapters = [read_ip_adapter(str(f.linked_path())) for f in fixtures]
    embeds = [_embeds(a, seed=4 + i) for i, a in enumerate(adapters)]
    scales = [{"up": {"block_1": [0.0, 1.0, 0.5]}}, {"down": {"block_2": 0.7}, "mid": 1.1}]
    _reference(twin, fixtures, scales)
    x, t, context, ours_extra, added = _inputs(sd15, twin)
    ours = _ours(_patched(sd15, list(zip(adapters, embeds)), scales), x, t, context, ours_extra, [1, 0])
    theirs = _theirs(twin, x, t, context, added, [_diffusers_image_embeds(e) for e in embeds])
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("model_name,fixture,shifted", [
    ("sd15", IP_ADAPTER_SD15, {"down": {"block_1": [0.0, 1.0]}}),        # reference: down_blocks.2.attentions.1
    ("sd15", IP_ADAPTER_SD15, {"down": {"block_2": [1.0, 0.0]}}),
    ("sdxl", IP_ADAPTER_SDXL_VIT_H, {"up": {"block_0": [1.0, 0.0, 0.0]}}),  # reference: up_blocks.0.attentions.1
    ("sdxl", IP_ADAPTER_SDXL_VIT_H, {"up": {"block_0": [0.0, 0.0, 1.0]}}),
], ids=["sd15-down_blocks.1", "sd15-attentions.0", "sdxl-attentions.0", "sdxl-attentions.2"])
def test_a_block_selection_off_by_one_fails_the_parity_check(request, twins, model_name, fixture, shifted):
    checkpoint = request.getfixturevalue(model_name)
    twin = twins(model_name, checkpoint)
    adapter = read_ip_adapter(str(fixture.linked_path()))
    embeds = _embeds(adapter, seed=5)
    reference = {"down": {"block_2": [0.0, 1.0]}} if model_name == "sd15" else {"up": {"block_0": [0.0, 1.0, 0.0]}}
    _reference(twin, [fixture], reference)
    x, t, context, ours_extra, added = _inputs(checkpoint, twin)
    theirs = _theirs(twin, x, t, context, added, [_diffusers_image_embeds(embeds)])
    right = _ours(_patched(checkpoint, [(adapter, embeds)], [reference]), x, t, context, ours_extra, [1, 0])
    wrong = _ours(_patched(checkpoint, [(adapter, embeds)], [shifted]), x, t, context, ours_extra, [1, 0])
    assert (right - theirs).abs().max().item() < TOLERANCE
    assert (wrong - theirs).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("model_name,fixture", [("sd15", IP_ADAPTER_PLUS_SD15), ("sdxl", IP_ADAPTER_SDXL_VIT_H)],
                         ids=["sd15-plus", "sdxl-base"])
def test_cond_and_uncond_rows_are_right_in_any_order_and_when_run_apart(request, twins, model_name, fixture):
    checkpoint = request.getfixturevalue(model_name)
    twin = twins(model_name, checkpoint)
    adapter = read_ip_adapter(str(fixture.linked_path()))
    embeds = _embeds(adapter, seed=6)
    m = _patched(checkpoint, [(adapter, embeds)], [SCALES[model_name]])
    x, t, context, extra, _ = _inputs(checkpoint, twin)
    together = _ours(m, x, t, context, extra, [1, 0])                      # row 0 uncond, row 1 cond
    swapped = _ours(m, x.flip(0), t, context.flip(0), {k: v.flip(0) for k, v in extra.items()}, [0, 1])
    uncond_alone = _ours(m, x[:1], t[:1], context[:1], {k: v[:1] for k, v in extra.items()}, [1])
    cond_alone = _ours(m, x[1:], t[1:], context[1:], {k: v[1:] for k, v in extra.items()}, [0])
    assert torch.allclose(together, swapped.flip(0), atol=1e-5)
    assert torch.allclose(together, torch.cat([uncond_alone, cond_alone]), atol=1e-5)
    assert (together[0] - _ours(m, x[:1], t[:1], context[:1], {k: v[:1] for k, v in extra.items()}, [0])[0]
            ).abs().max() > 100 * TOLERANCE  # uncond tokens are not the cond ones
