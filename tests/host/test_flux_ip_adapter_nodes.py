"""The IP-Adapter nodes take XLabs Flux adapters: the loader reads them from models/ipadapter by their
shapes, the apply nodes patch Flux's double blocks, and a wrong pairing gets a node error naming
the input and the fix (SD1.5 adapter on Flux, Flux adapter on SD3, ViT-H for a ViT-L adapter)."""
from __future__ import annotations

import pytest
import torch

from stylekit.dit_adapters.xlabs_flux import xlabs_flux_from_state_dict
from stylekit.host.block_weights import ALL, CUSTOM, STYLE
from stylekit.ip_adapter.encode import ImageEmbeds
from stylekit.ip_adapter.files import FOLDER, load_ip_adapter
from stylekit.ip_adapter.model import IMAGE_EMBEDS
from stylekit.nodes.ip_adapter import StyleKitIPAdapter, StyleKitIPAdapterApplyEmbeds, StyleKitIPAdapterLoader
from stylekit.tests.fixtures.dit_ip_adapters import xlabs_flux_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict
from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H
from stylekit.tests.support.host import load_clip_vision
from stylekit.tests.support.tiny_dits import TINY_FLUX, tiny_flux, tiny_mmdit

INJECTION = dict(weight=1.0, start_percent=0.0, end_percent=1.0, blocks=ALL, block_weights="", combine="concat")


def xlabs_file(clip_width: int = 24) -> dict:
    return random_state_dict(xlabs_flux_shapes(4, 2, TINY_FLUX["hidden_size"], 48, clip_width), 3, dtype=torch.float32)


def flux_embeds(n: int = 1, width: int = 24) -> ImageEmbeds:
    return ImageEmbeds(torch.randn(n, width), torch.zeros(n, width), IMAGE_EMBEDS)


def test_the_loader_reads_an_xlabs_flux_file_by_its_shapes(comfy_host, tmp_path, monkeypatch):
    import folder_paths
    import safetensors.torch

    safetensors.torch.save_file(xlabs_file(), str(tmp_path / "my-flux-style.safetensors"))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)] + paths, extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    (adapter,) = StyleKitIPAdapterLoader.execute(ipadapter_file="my-flux-style.safetensors").args
    assert adapter.kind == "xlabs_flux" and sorted(adapter.kv) == [0, 1] and adapter.tokens == 4


def test_apply_embeds_patches_every_double_block_of_flux(comfy_host):
    adapter = xlabs_flux_from_state_dict(xlabs_file(), "x")
    flux = tiny_flux(seed=1)
    (m,) = StyleKitIPAdapterApplyEmbeds.execute(model=flux, ipadapter=adapter, embeds=flux_embeds(2),
                                                **{**INJECTION, "blocks": CUSTOM, "block_weights": "double 1"}).args
    assert sorted(m.model_options["transformer_options"]["patches_replace"]["dit"]) == [("double_block", 1)]
    assert "patches_replace" not in flux.model_options["transformer_options"]


@pytest.mark.parametrize("change, input_name, message", [
    (dict(blocks=STYLE), "blocks", "names UNet blocks; on Flux choose 'all blocks'"),
    (dict(blocks=CUSTOM, block_weights="[1.0, 1.0, 1.0]"), "block_weights", "one per double block \\(2\\), got 3"),
    (dict(blocks=CUSTOM, block_weights="double 7"), "block_weights", "names no attention block"),
    (dict(combine="joint"), "combine", "choose concat or average"),
])
def test_bad_flux_settings_name_their_input(comfy_host, change, input_name, message):
    adapter = xlabs_flux_from_state_dict(xlabs_file(), "x")
    with pytest.raises(ValueError, match=rf"^StyleKit IP-Adapter Apply Embeds: input '{input_name}': .*{message}"):
        StyleKitIPAdapterApplyEmbeds.execute(model=tiny_flux(seed=1), ipadapter=adapter, embeds=flux_embeds(),
                                             **{**INJECTION, **change})


def test_a_unet_adapter_on_flux_and_a_flux_adapter_on_sd3_name_the_ipadapter_input(comfy_host):
    sd15_adapter = load_ip_adapter("ip-adapter_sd15.safetensors")
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Apply Embeds: input 'ipadapter': .*for SD1.x but the "
                                         r"model is Flux; load an adapter made for Flux"):
        StyleKitIPAdapterApplyEmbeds.execute(model=tiny_flux(seed=1), ipadapter=sd15_adapter,
                                             embeds=ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS),
                                             **INJECTION)
    flux_adapter = xlabs_flux_from_state_dict(xlabs_file(), "flux-ip-adapter.safetensors")
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Apply Embeds: input 'ipadapter': flux-ip-adapter"
                                         r".*XLabs Flux IP-Adapter but the model is an SD3/SD3.5 model"):
        StyleKitIPAdapterApplyEmbeds.execute(model=tiny_mmdit(seed=1), ipadapter=flux_adapter, embeds=flux_embeds(),
                                             **INJECTION)


def test_a_vit_h_vision_model_for_the_vit_l_flux_adapter_names_clip_vision(comfy_host):
    adapter = xlabs_flux_from_state_dict(xlabs_file(clip_width=768), "flux-ip-adapter.safetensors")
    vit_h = load_clip_vision(CLIP_VISION_VIT_H.filename)
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter: input 'clip_vision': .*768-d CLIP image embeds "
                                         r"\(ViT-L/14\).*1024-d \(ViT-H/14\)"):
        StyleKitIPAdapter.execute(model=tiny_flux(seed=1), ipadapter=adapter, clip_vision=vit_h,
                                  image=torch.rand(1, 64, 64, 3), **INJECTION)


def test_apply_embeds_patches_sd35_joint_blocks_with_or_without_a_mask(comfy_host):
    from stylekit.dit_adapters.files import dit_adapter_from_state_dict
    from stylekit.ip_adapter.model import PENULTIMATE
    from stylekit.tests.fixtures.dit_ip_adapters import instantx_sd35_shapes

    shapes = instantx_sd35_shapes(joint_blocks=2, hidden=128, width=128, depth=4, queries=8, embed=40, time_channels=32)
    adapter = dit_adapter_from_state_dict({p: random_state_dict(e, 4, dtype=torch.float32) for p, e in shapes.items()},
                                          "ip-adapter.bin")
    embeds = ImageEmbeds(torch.randn(1, 10, 40), torch.zeros(1, 10, 40), PENULTIMATE)
    sd35 = tiny_mmdit(seed=2)
    (m,) = StyleKitIPAdapterApplyEmbeds.execute(model=sd35, ipadapter=adapter, embeds=embeds, **INJECTION).args
    assert sorted(m.model_options["transformer_options"]["patches_replace"]["dit"]) == [("double_block", 0), ("double_block", 1)]
    (masked,) = StyleKitIPAdapterApplyEmbeds.execute(model=sd35, ipadapter=adapter, embeds=embeds,
                                                     attn_mask=torch.ones(8, 8), **INJECTION).args
    patch = masked.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)]
    assert patch.mask is not None and patch.mask.mask.shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Apply Embeds: input 'ipadapter': ip-adapter.bin is an "
                                         r"InstantX SD3.5-Large IP-Adapter but the model is not an SD3"):
        StyleKitIPAdapterApplyEmbeds.execute(model=tiny_flux(seed=1), ipadapter=adapter, embeds=embeds, **INJECTION)


def test_the_xlabs_v1_file_at_real_widths_loads_and_samples_on_the_flux_dev_fixture(flux_dev):
    import comfy.sample
    import comfy.samplers

    from stylekit.tests.support.tiny_dits import dit_conditioning

    (adapter,) = StyleKitIPAdapterLoader.execute(ipadapter_file="flux-ip-adapter.safetensors").args
    assert (adapter.version, adapter.clip_width, adapter.context_dim, adapter.hidden) == ("v1", 768, 4096, 3072)
    (m,) = StyleKitIPAdapterApplyEmbeds.execute(model=flux_dev, ipadapter=adapter, embeds=flux_embeds(1, 768),
                                                **INJECTION).args
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 1).cpu()
    run = lambda model: comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                                   dit_conditioning(model), [], torch.zeros_like(noise), disable_pbar=True)
    plain, patched = run(flux_dev), run(m)
    assert torch.isfinite(patched).all() and not torch.equal(plain, patched)
