"""Which weights get a LoRA: the attention projections of chosen transformer blocks.

DreamBooth-LoRA (diffusers) and B-LoRA (official code) both adapt to_q, to_k, to_v and to_out.0
of the self- (attn1) and cross-attention (attn2) layers; they differ in the blocks. Blocks are
addressed through the block map (DESIGN §2), never by a hard-coded table:
  - "all attention": every transformer of the UNet;
  - B-LoRA (Frenkel et al. 2024): content = SDXL up_blocks.0.attentions.0 (ComfyUI output 0),
    style = up_blocks.0.attentions.1 (output 1);
  - a block list: ComfyUI ids as the block map prints them ("output 1", "input 8") or diffusers
    names ("up_blocks.0.attentions.1"), separated by commas or new lines.
Weights are named as in the BaseModel's state dict ("diffusion_model.output_blocks.0.1.
transformer_blocks.0.attn1.to_q.weight"), the keys of ModelPatcher patches and weight wrappers.
"""
from __future__ import annotations

import re

import torch
from comfy.ldm.modules.attention import SpatialTransformer

from ..patching.block_map import AttentionSite, BlockMap, block_map
from ..patching.echo import echo
from ..patching.layer_select import MAX_LIST_CHARS

ALL_ATTENTION = "all attention"
BLORA_CONTENT_STYLE = "B-LoRA content + style"
BLORA_CONTENT = "B-LoRA content"
BLORA_STYLE = "B-LoRA style"
BLOCK_LIST = "block list"
PRESETS = (ALL_ATTENTION, BLORA_CONTENT_STYLE, BLORA_CONTENT, BLORA_STYLE, BLOCK_LIST)

# B-LoRA's two blocks, in diffusers names as the paper and its code give them.
BLORA_CONTENT_BLOCK = "up_blocks.0.attentions.0"
BLORA_STYLE_BLOCK = "up_blocks.0.attentions.1"

PROJECTION = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_COMFY_ID = re.compile(r"^(input|middle|output)[\s_]*(\d+)$")


def _unet(model) -> torch.nn.Module:
    base = getattr(model, "model", model)
    return getattr(base, "diffusion_model", base)


def parse_block_list(text: str, blocks: BlockMap) -> list[AttentionSite]:
    """Sites named in `text`; raises ValueError naming the first unknown item and what exists."""
    if len(text) > MAX_LIST_CHARS:
        raise ValueError(f"the block list is {len(text)} characters long, beyond the limit of {MAX_LIST_CHARS}; "
                         "name blocks such as 'output 1'")
    sites: list[AttentionSite] = []
    for item in (part.strip() for part in re.split(r"[,\n]", text)):
        if not item:
            continue
        match = _COMFY_ID.match(item.lower())
        try:
            site = (blocks.site((match[1], int(match[2]))) if match
                    else blocks.by_diffusers_name(item.removeprefix("unet.")))
        except KeyError:
            known = ", ".join(f"{s.block[0]} {s.block[1]} ({s.diffusers_name})" for s in blocks)
            raise ValueError(f"no attention block {echo(item)} in this model; it has: {known}") from None
        if site not in sites:
            sites.append(site)
    if not sites:
        raise ValueError("the block list is empty; name blocks such as 'output 1' or 'up_blocks.0.attentions.1'")
    return sites


def _by_name(blocks: BlockMap, name: str, preset: str) -> AttentionSite:
    try:
        return blocks.by_diffusers_name(name)
    except KeyError:
        raise ValueError(f"the {preset!r} preset trains {name} (an SDXL block) and this model has no such "
                         f"block; use an SDXL model, or 'all attention' / a block list") from None


def select_sites(model, preset: str, block_list: str = "") -> list[AttentionSite]:
    """The transformer blocks a preset (see PRESETS) picks in this model."""
    blocks = block_map(model)
    if preset == ALL_ATTENTION:
        return list(blocks)
    if preset == BLORA_CONTENT_STYLE:
        return [_by_name(blocks, BLORA_CONTENT_BLOCK, preset), _by_name(blocks, BLORA_STYLE_BLOCK, preset)]
    if preset == BLORA_CONTENT:
        return [_by_name(blocks, BLORA_CONTENT_BLOCK, preset)]
    if preset == BLORA_STYLE:
        return [_by_name(blocks, BLORA_STYLE_BLOCK, preset)]
    if preset == BLOCK_LIST:
        return parse_block_list(block_list, blocks)
    raise ValueError(f"unknown target preset {preset!r}; expected one of {PRESETS}")


def transformer_path(model, site: AttentionSite) -> str:
    """The state-dict path of a site's SpatialTransformer, e.g. "diffusion_model.output_blocks.0.1"."""
    unet = _unet(model)
    kind, number = site.block
    container, prefix = {"input": (unet.input_blocks, f"input_blocks.{number}"),
                         "output": (unet.output_blocks, f"output_blocks.{number}")}.get(
        kind, (None, "middle_block"))
    block = unet.middle_block if container is None else container[number]
    for index, child in enumerate(block.children()):
        if isinstance(child, SpatialTransformer):
            return f"diffusion_model.{prefix}.{index}"
    raise KeyError(f"block {kind} {number} holds no SpatialTransformer")


def projection_weights(model, sites: list[AttentionSite]) -> list[str]:
    """Weight keys of to_q/to_k/to_v/to_out.0 in attn1 and attn2 of every layer of `sites`."""
    base = getattr(model, "model", model)
    modules = dict(base.named_modules())
    keys = []
    for site in sites:
        path = transformer_path(model, site)
        for name, module in modules[path].named_modules():
            if PROJECTION.search(name) and isinstance(module, torch.nn.Linear):
                keys.append(f"{path}.{name}.weight")
    return keys


def site_of_weight(model, key: str, sites: list[AttentionSite]) -> AttentionSite | None:
    """The site among `sites` whose transformer holds the weight `key`, if any."""
    for site in sites:
        if key.startswith(transformer_path(model, site) + "."):
            return site
    return None
