"""The UNet's attention sites, derived from the loaded model (DESIGN §2), never hard-coded.

One row per SpatialTransformer, in the order ComfyUI runs them (input blocks, middle, output
blocks), with every name the ecosystem uses for it:
  - ComfyUI id   ("input", 8): the `block` of transformer_options and of attn replace patches;
  - transformer index: its position in that forward order (transformer_options' counter);
  - diffusers name "down_blocks.2.attentions.1";
  - IP-Adapter key numbers: `ip_adapter.N.*` of the official files, one per transformer depth.
    They count diffusers' `attn_processors` (attn1 and attn2 of every layer, in the order
    down, up, mid: the UNet registers up_blocks before mid_block), so cross-attention is odd.
The middle block is ("middle", 0): core sets that id, a patch under ("middle", 1) is never called.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

BlockId = tuple[str, int]
LayerId = tuple[str, int, int]  # (block name, block number, index inside the block's depth)


@dataclass(frozen=True)
class AttentionSite:
    block: BlockId
    transformer_index: int
    depth: int
    channels: int
    heads: int
    dim_head: int
    context_dim: int
    diffusers_name: str
    ip_adapter_keys: tuple[int, ...]

    def layers(self) -> list[LayerId]:
        return [(self.block[0], self.block[1], i) for i in range(self.depth)]


@dataclass(frozen=True)
class BlockMap:
    sites: tuple[AttentionSite, ...]

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def site(self, block: BlockId) -> AttentionSite:
        for s in self.sites:
            if s.block == block:
                return s
        known = ", ".join(f"{b}{n}" for b, n in (s.block for s in self.sites))
        raise KeyError(f"this model has no attention block {block[0]} {block[1]}; it has: {known}")

    def by_diffusers_name(self, name: str) -> AttentionSite:
        for s in self.sites:
            if s.diffusers_name == name:
                return s
        raise KeyError(f"this model has no attention block named {name}")

    def layers(self) -> list[LayerId]:
        return [layer for s in self.sites for layer in s.layers()]

    def describe(self) -> str:
        """A fixed-width table, one row per block."""
        head = f"{'ComfyUI id':<12} {'index':>5} {'diffusers name':<26} {'ch':>5} {'heads':>5} {'depth':>5}  ip-adapter keys"
        rows = [head, "-" * len(head)]
        for s in self.sites:
            keys = s.ip_adapter_keys
            key_text = str(keys[0]) if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"
            rows.append(f"{s.block[0] + ' ' + str(s.block[1]):<12} {s.transformer_index:>5} {s.diffusers_name:<26} "
                        f"{s.channels:>5} {s.heads:>5} {s.depth:>5}  {key_text}")
        rows.append(f"{len(self.sites)} transformers, {sum(s.depth for s in self.sites)} attention layers")
        return "\n".join(rows)


def _transformers_of(module: torch.nn.Module) -> list[SpatialTransformer]:
    return [m for m in module.children() if isinstance(m, SpatialTransformer)]


def _has(module: torch.nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in module.children())


def _walk(blocks, side: str, resample: type, diffusers_side: str):
    """Yield (ComfyUI id, diffusers name, transformer) for a side of the UNet.

    Levels are counted by the Downsample / Upsample layers that close them; input block 0 is
    conv_in. Positions inside a level count blocks, as diffusers' `attentions.i` does.
    """
    level, position = 0, 0
    for number, block in enumerate(blocks):
        if side == "input" and number == 0:
            continue
        if not _has(block, SpatialTransformer) and _has(block, resample) and side == "input":
            level, position = level + 1, 0  # a block that only downsamples
            continue
        for transformer in _transformers_of(block):
            yield (side, number), f"{diffusers_side}.{level}.attentions.{position}", transformer
        position += 1
        if side == "output" and _has(block, resample):
            level, position = level + 1, 0


def _site(block: BlockId, name: str, transformer: SpatialTransformer, index: int, first_key: int) -> AttentionSite:
    first = transformer.transformer_blocks[0]
    return AttentionSite(
        block=block, transformer_index=index, depth=len(transformer.transformer_blocks),
        channels=transformer.in_channels, heads=first.n_heads, dim_head=first.d_head,
        context_dim=first.attn2.to_k.in_features if first.attn2 is not None else 0,
        diffusers_name=name,
        ip_adapter_keys=tuple(first_key + 2 * i for i in range(len(transformer.transformer_blocks))),
    )


def block_map(model) -> BlockMap:
    """Build the map of a ModelPatcher, a BaseModel or a UNetModel (SD1.x/2.x/SDXL family)."""
    unet = getattr(model, "model", model)
    unet = getattr(unet, "diffusion_model", unet)
    if not hasattr(unet, "input_blocks") or not hasattr(unet, "output_blocks"):
        raise TypeError(f"{type(unet).__name__} is not a UNet with input/middle/output blocks "
                        "(SD1.x, SD2.x and SDXL families are supported)")
    down = list(_walk(unet.input_blocks, "input", Downsample, "down_blocks"))
    middle = unet.middle_block if unet.middle_block is not None else torch.nn.Module()
    mid = [(("middle", 0), "mid_block.attentions.0", t) for t in _transformers_of(middle)]
    up = list(_walk(unet.output_blocks, "output", Upsample, "up_blocks"))

    # IP-Adapter numbering follows diffusers' processor order: down, up, mid (module docstring).
    first_key: dict[int, int] = {}
    counter = 0
    for _, _, t in down + up + mid:
        first_key[id(t)] = 2 * counter + 1
        counter += len(t.transformer_blocks)

    sites = [_site(block, name, t, index, first_key[id(t)])
             for index, (block, name, t) in enumerate(down + mid + up)]
    return BlockMap(tuple(sites))
