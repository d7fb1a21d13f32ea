"""The model's attention sites, derived from the loaded model (DESIGN §2, §6), never hard-coded.

UNets (SD1.x, SD2.x, SDXL families): one row per SpatialTransformer, in the order ComfyUI runs
them (input blocks, middle, output blocks), with every name the ecosystem uses for it:
  - ComfyUI id   ("input", 8): the `block` of transformer_options and of attn replace patches;
  - transformer index: its position in that forward order (transformer_options' counter);
  - diffusers name "down_blocks.2.attentions.1";
  - IP-Adapter key numbers: `ip_adapter.N.*` of the official files, one per transformer depth.
    They count diffusers' `attn_processors` (attn1 and attn2 of every layer, in the order
    down, up, mid: the UNet registers up_blocks before mid_block), so cross-attention is odd.
The middle block is ("middle", 0): core sets that id, a patch under ("middle", 1) is never called.

DiTs: one row per transformer block, in the order the model runs them, each with its ComfyUI
block-replace key (`patches_replace["dit"]`), diffusers name and joint-attention stream order:
  - Flux: double blocks ("double", i), key ("double_block", i), diffusers transformer_blocks.i,
    stream order text then image; single blocks ("single", i), key ("single_block", i),
    single_transformer_blocks.i, one qkv over cat(text, image). Adapter key numbers: the global
    block index (double 0..D-1, then single D..), which XLabs' files use for double blocks.
  - SD3 / SD3.5 (MMDiT): joint blocks ("joint", i), key ("double_block", i) as core names it,
    diffusers transformer_blocks.i, stream order context then x; SD3.5-Medium's image-only
    self-attention (x_block.attn2) is listed in `extra_attention` of the blocks that have it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

BlockId = tuple[str, int]
LayerId = tuple[str, int, int]  # (block name, block number, index inside the block's depth)

UNET, FLUX_DOUBLE, FLUX_SINGLE, MMDIT_JOINT = "unet transformer", "flux double", "flux single", "mmdit joint"


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
    ip_adapter_keys: tuple[int, ...]   # the adapter key numbers of the site's layers (module docstring)
    kind: str = UNET
    patch_key: tuple = ()               # ComfyUI's key for it: the block id (UNet attn replace) or
                                        # ("double_block", i) / ("single_block", i) (DiT block replace)
    module_path: str = ""               # in the diffusion model: "input_blocks.8.1", "double_blocks.0"
    stream_order: tuple[str, ...] = ()  # joint attention: which stream comes first in the sequence
    extra_attention: tuple[str, ...] = ()  # further attention inside the block (SD3.5-M x_block.attn2)

    @property
    def width(self) -> int:
        return self.channels

    @property
    def is_dit(self) -> bool:
        return self.kind != UNET

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

    def by_patch_key(self, key: tuple) -> AttentionSite:
        for s in self.sites:
            if s.patch_key == key:
                return s
        raise KeyError(f"this model has no attention block under the ComfyUI key {key}")

    @property
    def is_dit(self) -> bool:
        return bool(self.sites) and self.sites[0].is_dit

    def describe(self) -> str:
        """A fixed-width table, one row per block."""
        if self.is_dit:
            head = (f"{'ComfyUI id':<11} {'patch key':<18} {'index':>5} {'diffusers name':<30} {'width':>5} "
                    f"{'heads':>5} {'depth':>5} {'key':>4}  streams")
        else:
            head = (f"{'ComfyUI id':<12} {'index':>5} {'diffusers name':<26} {'ch':>5} {'heads':>5} {'depth':>5}"
                    "  ip-adapter keys")
        rows = [head, "-" * len(head)]
        for s in self.sites:
            keys = s.ip_adapter_keys
            key_text = str(keys[0]) if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"
            name = s.block[0] + " " + str(s.block[1])
            if self.is_dit:
                extra = "".join(f"; + {e}" for e in s.extra_attention)
                rows.append(f"{name:<11} {str(s.patch_key):<18} {s.transformer_index:>5} {s.diffusers_name:<30} "
                            f"{s.width:>5} {s.heads:>5} {s.depth:>5} {key_text:>4}  {' then '.join(s.stream_order)}{extra}")
            else:
                rows.append(f"{name:<12} {s.transformer_index:>5} {s.diffusers_name:<26} "
                            f"{s.channels:>5} {s.heads:>5} {s.depth:>5}  {key_text}")
        what = "blocks" if self.is_dit else "transformers"
        rows.append(f"{len(self.sites)} {what}, {sum(s.depth for s in self.sites)} attention layers")
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


def _site(block: BlockId, name: str, transformer: SpatialTransformer, index: int, first_key: int,
          path: str) -> AttentionSite:
    first = transformer.transformer_blocks[0]
    return AttentionSite(
        block=block, transformer_index=index, depth=len(transformer.transformer_blocks),
        channels=transformer.in_channels, heads=first.n_heads, dim_head=first.d_head,
        context_dim=first.attn2.to_k.in_features if first.attn2 is not None else 0,
        diffusers_name=name,
        ip_adapter_keys=tuple(first_key + 2 * i for i in range(len(transformer.transformer_blocks))),
        patch_key=block, module_path=path,
    )


def _module_paths(unet: torch.nn.Module) -> dict[int, str]:
    """id(transformer) -> its path in the UNet ("input_blocks.8.1", "middle_block.1")."""
    return {id(m): name for name, m in unet.named_modules() if isinstance(m, SpatialTransformer)}


def _flux_sites(dit) -> list[AttentionSite]:
    sites = []
    doubles, singles = list(dit.double_blocks), list(dit.single_blocks)
    for i, block in enumerate(doubles):
        sites.append(AttentionSite(
            block=("double", i), transformer_index=i, depth=1, channels=block.hidden_size,
            heads=block.num_heads, dim_head=block.hidden_size // block.num_heads, context_dim=block.hidden_size,
            diffusers_name=f"transformer_blocks.{i}", ip_adapter_keys=(i,), kind=FLUX_DOUBLE,
            patch_key=("double_block", i), module_path=f"double_blocks.{i}", stream_order=("text", "image")))
    for i, block in enumerate(singles):
        sites.append(AttentionSite(
            block=("single", i), transformer_index=len(doubles) + i, depth=1, channels=block.hidden_size,
            heads=block.num_heads, dim_head=block.hidden_size // block.num_heads, context_dim=block.hidden_size,
            diffusers_name=f"single_transformer_blocks.{i}", ip_adapter_keys=(len(doubles) + i,), kind=FLUX_SINGLE,
            patch_key=("single_block", i), module_path=f"single_blocks.{i}", stream_order=("text", "image")))
    return sites


def _mmdit_sites(dit) -> list[AttentionSite]:
    sites = []
    for i, block in enumerate(dit.joint_blocks):
        attn = block.x_block.attn
        width = attn.qkv.in_features
        sites.append(AttentionSite(
            block=("joint", i), transformer_index=i, depth=1, channels=width, heads=attn.num_heads,
            dim_head=attn.head_dim, context_dim=block.context_block.attn.qkv.in_features,
            diffusers_name=f"transformer_blocks.{i}", ip_adapter_keys=(i,), kind=MMDIT_JOINT,
            patch_key=("double_block", i), module_path=f"joint_blocks.{i}", stream_order=("context", "x"),
            extra_attention=("x_block.attn2",) if getattr(block.x_block, "x_block_self_attn", False) else ()))
    return sites


def diffusion_model_of(model) -> torch.nn.Module:
    """The diffusion network of a ModelPatcher, a BaseModel or the network itself."""
    net = getattr(model, "model", model)
    return getattr(net, "diffusion_model", net)


def block_map(model) -> BlockMap:
    """Build the map of a ModelPatcher, a BaseModel or its diffusion network: a UNet (SD1.x/2.x/SDXL
    family), Flux, or an MMDiT (SD3 / SD3.5)."""
    unet = diffusion_model_of(model)
    if hasattr(unet, "double_blocks") and hasattr(unet, "single_blocks"):
        return BlockMap(tuple(_flux_sites(unet)))
    if hasattr(unet, "joint_blocks"):
        return BlockMap(tuple(_mmdit_sites(unet)))
    if not hasattr(unet, "input_blocks") or not hasattr(unet, "output_blocks"):
        raise TypeError(f"{type(unet).__name__} is not a UNet with input/middle/output blocks nor a Flux or "
                        "SD3 transformer (SD1.x, SD2.x, SDXL, Flux.1 and SD3/3.5 families are supported)")
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

    paths = _module_paths(unet)
    sites = [_site(block, name, t, index, first_key[id(t)], paths[id(t)])
             for index, (block, name, t) in enumerate(down + mid + up)]
    return BlockMap(tuple(sites))
