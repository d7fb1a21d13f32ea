"""Apply a B-LoRA's content part, style part or both (Frenkel et al. 2024).

A B-LoRA is one LoRA trained on two SDXL blocks; its content lives in up_blocks.0.attentions.0
(ComfyUI output 0) and its style in up_blocks.0.attentions.1 (output 1). Applying a part means
patching only that block's weights. Parts of different B-LoRAs combine (content of one image,
style of another) by applying one part of each on the same model.

Strength scales the weight delta linearly, as core's LoraLoader does. The official inference
script scales both factors of its diffusers LoRA by its alpha, so its alpha a equals a strength
of a².
"""
from __future__ import annotations

import logging

import comfy.lora
import comfy.lora_convert
import torch

from .errors import InputError
from .targets import BLORA_CONTENT, BLORA_STYLE, select_sites, site_of_weight

log = logging.getLogger("stylekit.blora")

# Official B-LoRA files come from diffusers' save_lora_weights: "unet.<diffusers module>.lora.down.weight"
# (or peft's lora_A / lora_B). Core's key map knows these modules under kohya names only.
_DIFFUSERS_FACTORS = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
                      ".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def kohya_keys(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA with diffusers-format UNet keys renamed to kohya names; other keys unchanged."""
    out = {}
    for key, value in lora.items():
        if key.startswith("unet."):
            for suffix, kohya_suffix in _DIFFUSERS_FACTORS.items():
                if key.endswith(suffix):
                    module = key[len("unet."):-len(suffix)]
                    key = "lora_unet_" + module.replace(".", "_") + kohya_suffix
                    break
        out[key] = value
    return out


def lora_patches(model, lora: dict[str, torch.Tensor]) -> dict:
    """Core's patches (BaseModel weight key -> adapter) for the UNet part of a LoRA state dict."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.load_lora(comfy.lora_convert.convert_lora(kohya_keys(lora)), key_map, log_missing=False)


def blora_parts(model, lora: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(content patches, style patches) of a B-LoRA for `model`; patches outside both blocks are
    left out (logged). InputError if the model lacks the blocks or the LoRA touches neither."""
    try:
        content_site = select_sites(model, BLORA_CONTENT)[0]
        style_site = select_sites(model, BLORA_STYLE)[0]
    except ValueError as err:
        raise InputError("model", str(err)) from None
    content, style, other = {}, {}, 0
    for key, patch in lora_patches(model, lora).items():
        site = site_of_weight(model, key, [content_site, style_site])
        if site is content_site:
            content[key] = patch
        elif site is style_site:
            style[key] = patch
        else:
            other += 1
    if not content and not style:
        raise InputError("lora", f"this LoRA has no weights in {content_site.diffusers_name} or {style_site.diffusers_name}, "
                         "so it is not a B-LoRA for this model")
    if other:
        log.info("B-LoRA: %d patched weights outside the content and style blocks are not applied", other)
    return content, style


def apply_blora(model, lora: dict[str, torch.Tensor], content_strength: float, style_strength: float):
    """A clone of `model` with the B-LoRA's content part at `content_strength` and style part at
    `style_strength` (0 leaves that part out)."""
    content, style = blora_parts(model, lora)
    patched = model.clone()
    if content_strength != 0.0:
        patched.add_patches(content, content_strength)
    if style_strength != 0.0:
        patched.add_patches(style, style_strength)
    return patched
