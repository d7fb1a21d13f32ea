"""The IP-Adapter and InstantStyle nodes: bad input gets an error naming the node, the input and the fix."""
from __future__ import annotations

import pytest
import torch

from stylekit.ip_adapter.encode import ImageEmbeds
from stylekit.ip_adapter.files import FOLDER, load_ip_adapter
from stylekit.ip_adapter.model import IMAGE_EMBEDS, PENULTIMATE
from stylekit.nodes.instantstyle import StyleKitInstantStyleContentSubtraction
from stylekit.nodes.ip_adapter import (StyleKitIPAdapter, StyleKitIPAdapterApplyEmbeds, StyleKitIPAdapterEncode,
                                       StyleKitIPAdapterLoader)
from stylekit.host.block_weights import ALL, CUSTOM
from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H
from stylekit.tests.support.host import load_clip_vision

INJECTION = dict(weight=1.0, start_percent=0.0, end_percent=1.0, blocks=ALL, block_weights="", combine="concat")


@pytest.fixture
def wrong_file(comfy_host, tmp_path, monkeypatch):
    """models/ipadapter holding a file that is a checkpoint fragment, not an adapter."""
    import folder_paths
    import safetensors.torch

    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.ones(4, 320, 3, 3)},
                                str(tmp_path / "not-an-adapter.safetensors"))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)] + paths, extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return "not-an-adapter.safetensors"


def test_the_loader_names_a_file_that_is_no_ip_adapter(wrong_file):
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Loader: input 'ipadapter_file': not-an-adapter"
                                         r".*not an IP-Adapter file.*choose an official IP-Adapter file"):
        StyleKitIPAdapterLoader.execute(ipadapter_file=wrong_file)


def test_the_loader_returns_the_adapter(comfy_host):
    (adapter,) = StyleKitIPAdapterLoader.execute(ipadapter_file="ip-adapter_sd15.safetensors").args
    assert adapter.kind == "base" and adapter.family == "SD1.x"


def test_a_mismatched_clip_vision_names_the_input_and_the_model_to_load(sdxl):
    vit_h = load_clip_vision(CLIP_VISION_VIT_H.filename)
    bigg_adapter = load_ip_adapter("ip-adapter_sdxl.safetensors")
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter: input 'clip_vision': .*ViT-bigG/14.*"
                                         r"CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"):
        StyleKitIPAdapter.execute(model=sdxl.model, ipadapter=bigg_adapter, clip_vision=vit_h, image=image, **INJECTION)
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Encode: input 'clip_vision'"):
        StyleKitIPAdapterEncode.execute(ipadapter=bigg_adapter, clip_vision=vit_h, image=image, crop="center")


def test_content_subtraction_with_a_plus_adapter_names_the_embeds_and_the_fix(comfy_host):
    plus_embeds = ImageEmbeds(torch.zeros(1, 257, 1280), torch.zeros(1, 257, 1280), PENULTIMATE)
    content = [[torch.zeros(1, 77, 1024), {"pooled_output": torch.zeros(1, 1024)}]]
    with pytest.raises(ValueError, match=r"^StyleKit InstantStyle Content Subtraction: input 'embeds': .*plus.*"
                                         r"base IP-Adapter"):
        StyleKitInstantStyleContentSubtraction.execute(embeds=plus_embeds, content=content, strength=0.5)


def test_content_from_another_clip_space_names_the_content_input(comfy_host):
    embeds = ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS)
    sdxl_content = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match=r"^StyleKit InstantStyle Content Subtraction: input 'content': .*is 1280-d.*"
                                         r"OpenCLIP ViT-H/14 text tower"):
        StyleKitInstantStyleContentSubtraction.execute(embeds=embeds, content=sdxl_content, strength=0.5)


def test_an_adapter_for_another_model_names_the_ipadapter_input(sdxl):
    adapter = load_ip_adapter("ip-adapter_sd15.safetensors")
    embeds = ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS)
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Apply Embeds: input 'ipadapter': .*for SD1.x.*SDXL"):
        StyleKitIPAdapterApplyEmbeds.execute(model=sdxl.model, ipadapter=adapter, embeds=embeds, **INJECTION)


@pytest.mark.parametrize("change,input_name,message", [
    (dict(blocks=CUSTOM, block_weights='{"output 12": 1}'), "block_weights", "names no attention block"),
    (dict(blocks=CUSTOM, block_weights="{oops"), "block_weights", "cannot read it"),
    (dict(block_weights='{"output 1": 1}'), "blocks", "choose 'custom"),
    (dict(start_percent=0.8, end_percent=0.2), "end_percent", "must not be after"),
])
def test_bad_injection_settings_name_their_input(sd15, change, input_name, message):
    adapter = load_ip_adapter("ip-adapter_sd15.safetensors")
    embeds = ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS)
    with pytest.raises(ValueError, match=rf"^StyleKit IP-Adapter Apply Embeds: input '{input_name}': .*{message}"):
        StyleKitIPAdapterApplyEmbeds.execute(model=sd15.model, ipadapter=adapter, embeds=embeds,
                                             **dict(INJECTION, **change))
