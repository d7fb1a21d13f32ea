"""The IP-Adapter patch on real ModelPatcher clones: where it lands, what it shares, when it acts."""
from __future__ import annotations

import copy

import pytest
import torch

from stylekit.ip_adapter.encode import ImageEmbeds, image_tokens
from stylekit.ip_adapter.files import load_ip_adapter
from stylekit.patching.attention_replace import ReplacePatch, installed_replace
from stylekit.host.block_map import block_map
from stylekit.host.block_weights import CUSTOM, STYLE, STYLE_LAYOUT
from stylekit.patching.ip_adapter import AdapterMismatch, IPAdapterPatch, IPAdapterSettings, apply_ip_adapter

ADAPTER = {"sd15": "ip-adapter_sd15.safetensors", "sdxl": "ip-adapter_sdxl_vit-h.safetensors"}


def _tokens(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, adapter.clip_width, generator=g)
    return image_tokens(adapter, ImageEmbeds(cond=cond, uncond=torch.zeros_like(cond), source=adapter.clip_input))


def _adapter_for(checkpoint):
    name = "sdxl" if checkpoint.model.model.adm_channels else "sd15"
    return load_ip_adapter(ADAPTER[name])


def _our_patches(model_patcher) -> dict:
    replaces = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    return {layer: p for layer, p in replaces.items() if isinstance(p, IPAdapterPatch)}


def _sample(checkpoint, model, seed=3, steps=3):
    import nodes

    (positive,) = nodes.CLIPTextEncode().encode(checkpoint.clip, "a lighthouse")
    (negative,) = nodes.CLIPTextEncode().encode(checkpoint.clip, "")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


class Hits(set):
    """Layers seen; one set however often clone() deep-copies the patches that hold it."""

    def __deepcopy__(self, memo):
        return self


class Recorder(ReplacePatch):
    """Stands for another pack's attn2 replace: plain attention, and a note that it was called."""

    def __init__(self, previous, hits, layer):
        super().__init__(previous)
        self.hits, self.layer = hits, layer

    def __call__(self, q, k, v, extra_options):
        self.hits.add(self.layer)
        return self.attention(q, k, v, extra_options)


def test_every_patch_is_hit_in_one_forward_pass_middle_block_included(checkpoint):
    """Each of our patches wraps a recorder; a recorder only runs when our patch at its layer does."""
    import comfy.model_management

    from stylekit.patching.attention_replace import install_replace

    bm = block_map(checkpoint.model)
    hits = Hits()
    m = checkpoint.model.clone()
    for layer in bm.layers():
        install_replace(m, "attn2", layer, lambda prev, layer=layer: Recorder(prev, hits, layer))
    adapter = _adapter_for(checkpoint)
    m = apply_ip_adapter(m, adapter, _tokens(adapter), IPAdapterSettings())
    assert set(_our_patches(m)) == set(bm.layers())
    comfy.model_management.load_model_gpu(m)
    context = torch.randn(2, 77, bm.sites[0].context_dim)
    extra = {"y": torch.randn(2, m.model.adm_channels)} if m.model.adm_channels else {}
    options = dict(m.model_options["transformer_options"], cond_or_uncond=[1, 0])
    m.model.diffusion_model(torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), context=context,
                            transformer_options=options, **extra)
    assert hits == set(bm.layers())
    assert ("middle", 0, 0) in hits


def test_the_input_model_is_untouched_and_clones_share_weights_and_tokens(sdxl):
    adapter = _adapter_for(sdxl)
    before = copy.deepcopy(sdxl.model.model_options)
    m = apply_ip_adapter(sdxl.model, adapter, _tokens(adapter), IPAdapterSettings())
    assert sdxl.model.model_options == before and not _our_patches(sdxl.model)
    chain = [m]
    for _ in range(10):
        chain.append(chain[-1].clone())
    # Core 0.3.75 deep-copies patch objects on clone(), 0.33 shares them; under either the heavy
    # parts are one copy...
    for layer, patch in _our_patches(chain[-1]).items():
        original = _our_patches(m)[layer]
        assert patch.kv is original.kv
        key = block_map(sdxl.model).site(layer[:2]).ip_adapter_keys[layer[2]]
        assert patch.kv.to_k.data_ptr() == adapter.kv[key][0].data_ptr()
    # ... and patching a clone further never reaches the model it was cloned from.
    parent = dict(_our_patches(chain[-1]))
    stacked = apply_ip_adapter(chain[-1], adapter, _tokens(adapter, seed=1), IPAdapterSettings(weight=0.5))
    assert _our_patches(chain[-1]) == parent
    assert all(isinstance(p.previous, IPAdapterPatch) and p.previous.kv is parent[layer].kv   # wraps the parent's
               for layer, p in _our_patches(stacked).items())                                   # (copied or shared)


def test_stacked_adapters_wrap_each_other_and_keep_another_packs_replace(sd15):
    adapter = _adapter_for(sd15)
    m = sd15.model.clone()

    def foreign(q, k, v, extra_options):
        return torch.zeros_like(q)

    m.set_model_attn2_replace(foreign, "output", 4)  # block-wide, as many packs register
    m = apply_ip_adapter(m, adapter, _tokens(adapter, 1), IPAdapterSettings())
    m = apply_ip_adapter(m, adapter, _tokens(adapter, 2), IPAdapterSettings())
    outer = installed_replace(m, "attn2", ("output", 4, 0))
    assert isinstance(outer, IPAdapterPatch) and isinstance(outer.previous, IPAdapterPatch)
    assert outer.previous.previous is foreign


def test_weight_zero_installs_nothing_and_samples_exactly_like_the_plain_model(sd15):
    adapter = _adapter_for(sd15)
    m = apply_ip_adapter(sd15.model, adapter, _tokens(adapter), IPAdapterSettings(weight=0.0))
    assert not _our_patches(m)
    assert torch.equal(_sample(sd15, m), _sample(sd15, sd15.model))


def test_a_sigma_window_after_the_last_step_changes_nothing_and_a_partial_one_acts(sd15):
    adapter, tokens = _adapter_for(sd15), _tokens(_adapter_for(sd15))
    plain = _sample(sd15, sd15.model)
    never = apply_ip_adapter(sd15.model, adapter, tokens, IPAdapterSettings(start_percent=1.0, end_percent=1.0))
    first_half = apply_ip_adapter(sd15.model, adapter, tokens, IPAdapterSettings(start_percent=0.0, end_percent=0.5))
    always = apply_ip_adapter(sd15.model, adapter, tokens, IPAdapterSettings())
    assert torch.equal(_sample(sd15, never), plain)
    partial, full = _sample(sd15, first_half), _sample(sd15, always)
    assert not torch.allclose(partial, plain) and not torch.allclose(partial, full)


@pytest.mark.parametrize("model_name,preset,layers", [
    ("sdxl", STYLE, [("output", 1, i) for i in range(10)]),
    ("sdxl", STYLE_LAYOUT, [("input", 8, i) for i in range(10)] + [("output", 1, i) for i in range(10)]),
    ("sd15", STYLE, [("output", n, 0) for n in (3, 4, 5)]),
    ("sd15", STYLE_LAYOUT, [("input", 7, 0), ("input", 8, 0), ("middle", 0, 0)] + [("output", n, 0) for n in (3, 4, 5)]),
])
def test_instantstyle_presets_patch_exactly_their_blocks(request, model_name, preset, layers):
    checkpoint = request.getfixturevalue(model_name)
    adapter = _adapter_for(checkpoint)
    m = apply_ip_adapter(checkpoint.model, adapter, _tokens(adapter), IPAdapterSettings(blocks=preset))
    assert sorted(_our_patches(m)) == sorted(layers)


def test_per_layer_weight_is_the_global_weight_times_the_block_weight(sdxl):
    adapter = _adapter_for(sdxl)
    depth_weights = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    settings = IPAdapterSettings(weight=0.8, blocks=CUSTOM, block_weights={"output 1": depth_weights})
    patches = _our_patches(apply_ip_adapter(sdxl.model, adapter, _tokens(adapter), settings))
    assert {layer: p.weight for layer, p in patches.items()} == {
        ("output", 1, i): 0.8 * w for i, w in enumerate(depth_weights) if w}


def test_a_mask_restricts_the_image_term_to_its_tokens(sd15):
    adapter = _adapter_for(sd15)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    patched = apply_ip_adapter(sd15.model, adapter, _tokens(adapter), IPAdapterSettings(attn_mask=mask))
    patch = _our_patches(patched)[("output", 9, 0)]
    plain = ReplacePatch()
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 64, 320, generator=g), torch.randn(2, 77, 320, generator=g), torch.randn(2, 77, 320, generator=g)
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "original_shape": [2, 4, 8, 8], "activations_shape": [2, 320, 8, 8]}
    out, ref = patch(q, k, v, extra).reshape(2, 8, 8, 320), plain.attention(q, k, v, extra).reshape(2, 8, 8, 320)
    assert torch.equal(out[:, :, 4:], ref[:, :, 4:])          # right half: plain attention exactly
    assert not torch.allclose(out[:, :, :4], ref[:, :, :4])   # left half: the image acts


def test_an_all_zero_mask_samples_exactly_like_the_plain_model(sd15):
    adapter = _adapter_for(sd15)
    m = apply_ip_adapter(sd15.model, adapter, _tokens(adapter), IPAdapterSettings(attn_mask=torch.zeros(1, 32, 32)))
    assert torch.equal(_sample(sd15, m), _sample(sd15, sd15.model))


def test_an_adapter_for_another_model_is_refused_naming_both(sd15, sdxl):
    sdxl_adapter = load_ip_adapter(ADAPTER["sdxl"])
    with pytest.raises(AdapterMismatch, match=r"for SDXL .* but the model is SD1.x"):
        apply_ip_adapter(sd15.model, sdxl_adapter, _tokens(sdxl_adapter), IPAdapterSettings())
    sd15_adapter = load_ip_adapter(ADAPTER["sd15"])
    with pytest.raises(AdapterMismatch, match=r"for SD1.x .* but the model is SDXL"):
        apply_ip_adapter(sdxl.model, sd15_adapter, _tokens(sd15_adapter), IPAdapterSettings())


def test_image_keys_and_values_are_computed_once_per_device_and_dtype(sd15):
    adapter = _adapter_for(sd15)
    m = apply_ip_adapter(sd15.model, adapter, _tokens(adapter), IPAdapterSettings())
    kv = _our_patches(m)[("input", 1, 0)].kv
    first = kv.get(torch.device("cpu"), torch.float32)
    assert kv.get(torch.device("cpu"), torch.float32)[0] is first[0]
    expected = adapter.projection(torch.zeros(1, 1024)) @ adapter.kv[1][0].float().T   # uncond keys
    assert torch.allclose(first[2], expected, atol=1e-5)
    assert kv.get(torch.device("cpu"), torch.float16)[0].dtype == torch.float16
