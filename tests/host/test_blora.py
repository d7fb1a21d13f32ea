"""B-LoRA on the SDXL fixture: training only the two blocks, applying either part, official files."""
from __future__ import annotations

import types

import numpy as np
import pytest
import safetensors.torch
import torch

from stylekit.tests.fixtures.images import content_image
from stylekit.training.lora_file import lora_path

LORA = "StyleKit/test_blora_content"
CONTENT_PREFIX = "diffusion_model.output_blocks.0.1."   # up_blocks.0.attentions.0
STYLE_PREFIX = "diffusion_model.output_blocks.1.1."     # up_blocks.0.attentions.1


def _sample(model, clip, text="A [v]"):
    import nodes

    (positive,) = nodes.CLIPTextEncode().encode(clip, text)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, 5, 2, 1.0, "euler", "normal", positive, positive, latent)[0]["samples"]


@pytest.fixture(scope="module")
def trained(comfy_host):
    from stylekit.nodes.dreambooth import StyleKitBLoRATrain
    from stylekit.tests.support.host import load_checkpoint
    from stylekit.tests.fixtures.registry import SDXL_CHECKPOINT

    model, clip, vae = load_checkpoint(SDXL_CHECKPOINT.filename)
    image = torch.from_numpy(np.asarray(content_image().resize((64, 64)), dtype=np.float32) / 255)[None]
    with torch.inference_mode():
        out = StyleKitBLoRATrain.execute(model, clip, vae, image, "[v]", 3, 1e-3, 4, 0, LORA)
    yield types.SimpleNamespace(model=model, clip=clip, vae=vae, output=out.result, summary=out.ui.as_dict()["text"][0])
    lora_path(LORA).unlink(missing_ok=True)


def test_blora_training_saves_only_the_content_and_style_blocks(trained):
    saved = safetensors.torch.load_file(str(lora_path(LORA)))
    prefixes = {k.split("_transformer_blocks_")[0] for k in saved}
    assert prefixes == {"lora_unet_output_blocks_0_1", "lora_unet_output_blocks_1_1"}
    assert len(saved) == 2 * 10 * 2 * 4 * 3  # blocks x depth x (attn1, attn2) x (q, k, v, out) x (up, down, alpha)
    assert saved.keys() == trained.output[1].keys()
    with safetensors.safe_open(str(lora_path(LORA)), "pt") as f:
        meta = f.metadata()
    assert meta["stylekit_method"] == "B-LoRA" and meta["stylekit_instance_prompt"] == "A [v]"
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "up_blocks.0.attentions.1" in meta["stylekit_blocks"]


def _apply(trained, lora, content, style):
    from stylekit.nodes.dreambooth import StyleKitApplyBLoRA

    return StyleKitApplyBLoRA.execute(trained.model, lora, content, style).result[0]


def test_each_part_patches_only_its_block_with_its_strength(trained):
    lora = trained.output[1]
    content = _apply(trained, lora, 1.0, 0.0)
    style = _apply(trained, lora, 0.0, 1.1)
    both = _apply(trained, lora, 0.7, 1.1)
    assert len(content.patches) == len(style.patches) == 80
    assert all(k.startswith(CONTENT_PREFIX) for k in content.patches)
    assert all(k.startswith(STYLE_PREFIX) for k in style.patches)
    assert {p[0][0] for k, p in both.patches.items() if k.startswith(CONTENT_PREFIX)} == {0.7}
    assert {p[0][0] for k, p in both.patches.items() if k.startswith(STYLE_PREFIX)} == {1.1}
    assert not trained.model.patches  # the input model is untouched


def test_parts_change_the_output_and_zero_strengths_are_the_plain_model(trained):
    lora = trained.output[1]
    with torch.inference_mode():
        plain = _sample(trained.model, trained.clip)
        off = _sample(_apply(trained, lora, 0.0, 0.0), trained.clip)
        content = _sample(_apply(trained, lora, 1.0, 0.0), trained.clip)
        style = _sample(_apply(trained, lora, 0.0, 1.0), trained.clip)
        both = _sample(_apply(trained, lora, 1.0, 1.0), trained.clip)
        node_model = _sample(trained.output[0], trained.clip)
    assert torch.equal(off, plain)
    assert not torch.allclose(content, plain, atol=1e-4) and not torch.allclose(style, plain, atol=1e-4)
    assert not torch.allclose(content, style, atol=1e-4)
    assert torch.equal(both, node_model)  # both parts at 1 = the whole B-LoRA the node applied


def _official_format(lora: dict[str, torch.Tensor], peft: bool) -> dict[str, torch.Tensor]:
    """Our file in the official B-LoRA layout (diffusers' save_lora_weights: "unet.<module>.lora.down.weight",
    or peft's lora_A / lora_B; no alphas, scale 1), named by diffusers' own kohya converter."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(lora), types.SimpleNamespace(layers_per_block=2))
    unet, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    out = {}
    for key, value in unet.items():  # "...attn1.processor.to_out_lora.down.weight"
        module, factor = key.replace(".processor.", ".").replace("to_out_lora", "to_out.0_lora").split("_lora.")
        suffix = {"down.weight": "lora_A.weight", "up.weight": "lora_B.weight"}[factor] if peft else f"lora.{factor}"
        out[f"{module}.{suffix}"] = value
    return out


@pytest.mark.parametrize("peft", [False, True])
def test_official_diffusers_format_blora_files_apply_like_ours(trained, peft):
    lora = trained.output[1]
    official = _official_format(lora, peft)
    assert all(k.startswith("unet.up_blocks.0.attentions.") for k in official)
    with torch.inference_mode():
        ours = _sample(_apply(trained, lora, 0.0, 1.0), trained.clip)
        theirs = _sample(_apply(trained, official, 0.0, 1.0), trained.clip)
    assert torch.equal(ours, theirs)


def test_load_blora_node_reads_a_file_from_models_loras(trained):
    from stylekit.nodes.dreambooth import StyleKitLoadBLoRA

    (loaded,) = StyleKitLoadBLoRA.execute(LORA + ".safetensors").result
    assert loaded.keys() == trained.output[1].keys()
    assert all(torch.equal(loaded[k], trained.output[1][k]) for k in loaded)


def test_a_lora_without_blora_blocks_or_a_model_without_them_is_refused(trained, sd15):
    lora = {k: v for k, v in trained.output[1].items() if "output_blocks_0_1" not in k and "output_blocks_1_1" not in k}
    lora["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"StyleKit Apply B-LoRA: input 'lora': .* not a B-LoRA"):
        _apply(trained, lora, 1.0, 1.0)
    from stylekit.nodes.dreambooth import StyleKitApplyBLoRA

    with pytest.raises(ValueError, match=r"StyleKit Apply B-LoRA: input 'model': .*SDXL"):
        StyleKitApplyBLoRA.execute(sd15.model, trained.output[1], 1.0, 1.0)
