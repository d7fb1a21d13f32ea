"""Which weights get LoRAs, how the file names them, and how it is written (training/targets.py,
training/lora_file.py), against core's LoRA key map and diffusers' kohya converter."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch

from stylekit.training.lora_file import (kohya_names, lora_path, lora_state_dict, normalized_lora_name,
                                         save_atomically)
from stylekit.training.targets import (ALL_ATTENTION, BLOCK_LIST, BLORA_CONTENT, BLORA_CONTENT_STYLE, BLORA_STYLE,
                                       projection_weights, select_sites)

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def test_all_attention_on_sd15_targets_every_q_k_v_out_of_attn1_and_attn2(sd15):
    keys = projection_weights(sd15.model, select_sites(sd15.model, ALL_ATTENTION))
    assert len(keys) == 16 * 2 * 4
    state = sd15.model.model.state_dict()
    assert all(k in state and state[k].ndim == 2 for k in keys)
    assert {k.split(".attn")[1][2:-len(".weight")] for k in keys} == set(PROJECTIONS)
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.weight" in keys


def test_blora_presets_pick_sdxl_up_blocks_0_attentions_0_and_1(sdxl):
    content = projection_weights(sdxl.model, select_sites(sdxl.model, BLORA_CONTENT))
    style = projection_weights(sdxl.model, select_sites(sdxl.model, BLORA_STYLE))
    both = projection_weights(sdxl.model, select_sites(sdxl.model, BLORA_CONTENT_STYLE))
    assert len(content) == len(style) == 10 * 2 * 4 and both == content + style
    assert all(k.startswith("diffusion_model.output_blocks.0.1.transformer_blocks.") for k in content)
    assert all(k.startswith("diffusion_model.output_blocks.1.1.transformer_blocks.") for k in style)
    assert [s.diffusers_name for s in select_sites(sdxl.model, BLORA_CONTENT_STYLE)] == [
        "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]


def test_a_block_list_takes_comfy_ids_and_diffusers_names(sdxl):
    sites = select_sites(sdxl.model, BLOCK_LIST, "output 1,\n input_8, unet.up_blocks.0.attentions.1, middle 0")
    assert [s.block for s in sites] == [("output", 1), ("input", 8), ("middle", 0)]


def test_an_unknown_block_is_refused_with_the_blocks_that_exist(sd15):
    with pytest.raises(ValueError, match=r"'output 0' names no attention block of this model; it has: input 1 \(down_blocks\.0"):
        select_sites(sd15.model, BLOCK_LIST, "output 3, output 0")
    with pytest.raises(ValueError, match="SDXL block"):
        select_sites(sd15.model, BLORA_STYLE)


@pytest.mark.parametrize("model_name, first", [
    ("sd15", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
])
def test_kohya_names_follow_sd_scripts_and_core_maps_each_back_to_its_weight(request, model_name, first):
    import comfy.lora

    model = request.getfixturevalue(model_name).model
    keys = projection_weights(model, select_sites(model, ALL_ATTENTION))
    names = kohya_names(model, keys)
    assert names[keys[0]] == first
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert all(key_map[name] == key for key, name in names.items())


def _blora_state_dict(model, rank: int = 2) -> dict[str, torch.Tensor]:
    keys = projection_weights(model, select_sites(model, BLORA_CONTENT_STYLE))
    g = torch.Generator().manual_seed(0)
    state = model.model.state_dict()
    factors = {k: (torch.randn(state[k].shape[0], rank, generator=g), torch.randn(rank, state[k].shape[1], generator=g))
               for k in keys}
    return lora_state_dict(model, factors, alpha=rank)


def test_diffusers_reads_a_saved_blora_as_exactly_the_two_blora_blocks(sdxl):
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    lora = _blora_state_dict(sdxl.model)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(lora), types.SimpleNamespace(layers_per_block=2))
    unet, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)
    blocks = {k.split(".transformer_blocks.")[0] for k in unet}
    assert blocks == {"unet.up_blocks.0.attentions.0", "unet.up_blocks.0.attentions.1"}
    assert len(unet) == 2 * 10 * 2 * 4 * 2 and set(alphas.values()) == {2.0}


def test_lora_names_stay_inside_models_loras():
    assert normalized_lora_name(" StyleKit/my_dog ") == "StyleKit/my_dog.safetensors"
    assert normalized_lora_name("a\\b.safetensors") == "a/b.safetensors"
    for bad in ("", "   ", "../escape", "/abs/path", "a/../../b", "C:/x"):
        with pytest.raises(ValueError, match="inside models/loras"):
            normalized_lora_name(bad)


def test_lora_path_is_under_the_first_loras_folder(comfy_host):
    import folder_paths

    assert lora_path("StyleKit/x") == Path(folder_paths.get_folder_paths("loras")[0]) / "StyleKit" / "x.safetensors"


def test_saving_replaces_the_file_only_once_it_is_complete(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "lora.safetensors"
    save_atomically({"a": torch.ones(2)}, target, {"k": "v"})
    assert safetensors.torch.load_file(str(target))["a"].tolist() == [1.0, 1.0]

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_atomically({"a": torch.zeros(2)}, target, {})
    monkeypatch.undo()  # the old file is intact and nothing else is left
    assert safetensors.torch.load_file(str(target))["a"].tolist() == [1.0, 1.0]
    assert os.listdir(target.parent) == ["lora.safetensors"]
