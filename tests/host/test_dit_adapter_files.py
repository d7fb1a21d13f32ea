"""DiT IP-Adapter files: read unchanged, typed by shapes, and their learned parts equal diffusers'.

The fixture builders write the real key layouts; diffusers 0.39's own loaders (the converters its
pipelines call) read the same dicts strict into ImageProjection / IPAdapterTimeImageProjection /
SD3IPAdapterJointAttnProcessor2_0, and the outputs are compared on the same weights in fp32.
"""
from __future__ import annotations

import types

import pytest
import safetensors.torch
import torch
from diffusers.loaders.transformer_flux import FluxTransformer2DLoadersMixin
from diffusers.loaders.transformer_sd3 import SD3Transformer2DLoadersMixin
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection

from stylekit.dit_adapters.files import dit_adapter_from_state_dict, dit_adapter_kind, read_dit_adapter
from stylekit.dit_adapters.instantx_sd35 import InstantXSD35Adapter
from stylekit.dit_adapters.xlabs_flux import XLabsFluxAdapter
from stylekit.tests.fixtures import dit_ip_adapters
from stylekit.tests.fixtures.random_weights import random_state_dict

# diffusers' converters only read `self` on their low-memory path, which these calls turn off.
NO_SELF = types.SimpleNamespace()


def _fp32(sd):
    return {k: _fp32(v) if isinstance(v, dict) else v.float() for k, v in sd.items()}


def small_xlabs(tokens, blocks=3, hidden=32, context=48, clip=24, seed=0):
    return _fp32(random_state_dict(dit_ip_adapters.xlabs_flux_shapes(tokens, blocks, hidden, context, clip), seed))


def small_instantx(blocks=3, seed=0):
    shapes = dit_ip_adapters.instantx_sd35_shapes(joint_blocks=blocks, hidden=128, width=128, depth=4, queries=8,
                                                  embed=40, time_channels=32)
    return {part: _fp32(random_state_dict(entries, seed)) for part, entries in shapes.items()}


@pytest.mark.parametrize("tokens", [4, 16])
def test_xlabs_projection_matches_diffusers_image_projection(tokens):
    sd = small_xlabs(tokens)
    adapter = dit_adapter_from_state_dict(sd, "x")
    proj = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("ip_adapter_proj_model.")}
    if tokens == 4:
        theirs = FluxTransformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(NO_SELF, proj, False)
    else:  # diffusers' loader recognises v2 by 65,536 rows (4096-wide tokens only); same class and renaming
        theirs = ImageProjection(image_embed_dim=24, cross_attention_dim=48, num_image_text_embeds=16)
        theirs.load_state_dict({k.replace("proj", "image_embeds"): v for k, v in proj.items()})
    embeds = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, want = adapter.projection(embeds), theirs(embeds)
    assert ours.shape == (3, tokens, 48)
    assert (ours - want).abs().max() < 1e-5


def test_xlabs_block_kv_matches_diffusers_processor_weights():
    sd = small_xlabs(4)
    adapter = dit_adapter_from_state_dict(sd, "x")
    e = torch.randn(2, 4, 48, generator=torch.Generator().manual_seed(2))
    for block in range(3):
        prefix = f"double_blocks.{block}.processor.ip_adapter_double_stream_"
        k, v = adapter.kv[block](e)
        torch.testing.assert_close(k, e @ sd[prefix + "k_proj.weight"].T + sd[prefix + "k_proj.bias"])
        torch.testing.assert_close(v, e @ sd[prefix + "v_proj.weight"].T + sd[prefix + "v_proj.bias"])


def test_xlabs_files_are_typed_by_shapes():
    v1 = dit_adapter_from_state_dict(dit_ip_adapters.build_xlabs_flux_v1(0), "flux-ip-adapter.safetensors")
    assert isinstance(v1, XLabsFluxAdapter)
    assert (v1.version, v1.tokens, v1.clip_width, v1.context_dim, v1.hidden, sorted(v1.kv)) == ("v1", 4, 768, 4096, 3072, [0])
    v2_shapes = dit_ip_adapters.xlabs_flux_shapes(16)
    assert dict(v2_shapes)["ip_adapter_proj_model.proj.weight"] == (65536, 768)  # diffusers' v2 criterion
    assert "XLabs Flux IP-Adapter v1" in v1.describe()


def test_instantx_resampler_matches_diffusers_time_image_projection():
    sd = small_instantx()
    adapter = dit_adapter_from_state_dict(sd, "ip-adapter.bin")
    theirs = SD3Transformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        NO_SELF, sd["image_proj"], low_cpu_mem_usage=False)  # strict load: the fixture's names are the file's
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 40, generator=g)
    timesteps = torch.tensor([999.0, 371.5])  # SD3 timestep = sigma·1000
    with torch.no_grad():
        tokens, temb = adapter.resampler(x, timesteps)
        want_tokens, want_temb = theirs(x, timesteps)
    assert tokens.shape == (2, 8, 128) and temb.shape == (2, 128)
    assert (tokens - want_tokens).abs().max() < 1e-5
    assert (temb - want_temb).abs().max() < 1e-5


def test_instantx_layer_weights_match_diffusers_processor():
    sd = small_instantx()
    adapter = dit_adapter_from_state_dict(sd, "ip-adapter.bin")
    g = torch.Generator().manual_seed(4)
    tokens, temb = torch.randn(2, 8, 128, generator=g), torch.randn(2, 128, generator=g)
    q_raw, k_raw = torch.randn(2, 9, 128, generator=g), torch.randn(2, 9, 128, generator=g)
    for block in range(3):
        processor = SD3IPAdapterJointAttnProcessor2_0(128, 128, 64, 128)
        processor.load_state_dict({k.split(".", 1)[1]: v for k, v in sd["ip_adapter"].items()
                                   if k.startswith(f"{block}.")})
        layer = adapter.layers[block]
        with torch.no_grad():
            e = processor.norm_ip(tokens, temb=temb)
            want_k = processor.norm_ip_k(processor.to_k_ip(e).unflatten(-1, (2, 64))).flatten(-2)
            want_v = processor.to_v_ip(e)
            ip_k, ip_v = layer.image_kv(tokens, temb)
            q, k = layer.queries_keys(q_raw, k_raw)
        assert (ip_k - want_k).abs().max() < 1e-5 and (ip_v - want_v).abs().max() < 1e-5
        assert (q - processor.norm_q(q_raw.unflatten(-1, (2, 64))).flatten(-2)).abs().max() < 1e-5
        assert (k - processor.norm_k(k_raw.unflatten(-1, (2, 64))).flatten(-2)).abs().max() < 1e-5


def test_instantx_file_is_typed_by_shapes_and_reads_flat_or_nested():
    nested = dit_ip_adapters.build_instantx_sd35(0)
    adapter = dit_adapter_from_state_dict(nested, "ip-adapter.bin")
    assert isinstance(adapter, InstantXSD35Adapter)
    assert (adapter.tokens, adapter.clip_width, adapter.hidden, sorted(adapter.layers)) == (64, 1152, 128, [0, 1])
    flat = {f"{part}.{k}": v for part, entries in nested.items() for k, v in entries.items()}
    assert dit_adapter_kind(flat) == "instantx_sd35"


def test_files_round_trip_from_disk(tmp_path):
    path = tmp_path / "flux-ip-adapter.safetensors"
    safetensors.torch.save_file(dit_ip_adapters.build_xlabs_flux_v1(1), str(path))
    assert read_dit_adapter(str(path)).kind == "xlabs_flux"
    bin_path = tmp_path / "ip-adapter.bin"
    torch.save(dit_ip_adapters.build_instantx_sd35(1), bin_path)
    assert read_dit_adapter(str(bin_path)).kind == "instantx_sd35"


def test_other_files_are_refused_with_what_was_expected():
    unet_adapter = {"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)}
    assert dit_adapter_kind(unet_adapter) is None
    with pytest.raises(ValueError, match="neither an XLabs Flux IP-Adapter .* nor an InstantX SD3.5"):
        dit_adapter_from_state_dict(unet_adapter, "ip-adapter_sd15.safetensors")
    broken = small_xlabs(4)
    del broken["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"]
    with pytest.raises(ValueError, match="double block 1 lacks \\['v_bias'\\]"):
        dit_adapter_from_state_dict(broken, "x")
    no_norm_bias = small_xlabs(4)
    del no_norm_bias["ip_adapter_proj_model.norm.bias"]
    with pytest.raises(ValueError, match="image projection weights do not fit"):
        dit_adapter_from_state_dict(no_norm_bias, "x")
    resampler_missing = small_instantx()
    del resampler_missing["image_proj"]["layers.1.0.to_q.weight"]
    with pytest.raises(ValueError, match="resampler weights do not fit"):
        dit_adapter_from_state_dict(resampler_missing, "ip-adapter.bin")


def test_adapters_are_shared_not_copied_by_clones():
    import copy

    adapter = dit_adapter_from_state_dict(small_xlabs(4), "x")
    assert copy.deepcopy({"a": adapter})["a"] is adapter
