"""Block presets and custom block lists for the self-attention methods, resolved on the block map.

Users name blocks in the one block grammar (host/blocks.py): ComfyUI ids and ranges ("output 3-5",
"input 8", "output" = every output block), diffusers names and prefixes ("up_blocks.1" = every
attention of that up block, "mid_block"), DiT blocks ("single 0-37"); presets are resolved on the
loaded model's map, never from a hard-coded table.
"""
from __future__ import annotations

from .block_map import BlockId, BlockMap, LayerId, block_map
from .blocks import parse_block_list

ALL = "all"
UP_ONLY = "up blocks only"
VSP_DEFAULT = "highest-resolution up block"
CUSTOM = "custom"

def highest_resolution_up_block(bmap: BlockMap) -> tuple[BlockId, ...]:
    """The last diffusers up block that has attention: SDXL up_blocks.1 (output 3, 4, 5), the
    official Visual Style Prompting layers; SD1.5 up_blocks.3 (output 9, 10, 11), the block that
    plays the same role there (the decoder's last, finest attention level)."""
    ups = [s for s in bmap if s.diffusers_name.startswith("up_blocks.")]
    if not ups:
        raise ValueError("this model has no attention in its up blocks")
    last = max(int(s.diffusers_name.split(".")[1]) for s in ups)
    return tuple(s.block for s in ups if s.diffusers_name.startswith(f"up_blocks.{last}."))


def parse_blocks(text: str, bmap: BlockMap) -> tuple[BlockId, ...]:
    """Blocks named in a block list (the grammar of host/blocks.py); ValueError names any unknown entry."""
    return tuple(s.block for s in parse_block_list(bmap, text))


def select_blocks(bmap: BlockMap, preset: str, custom: str = "") -> tuple[BlockId, ...]:
    if preset == ALL:
        return tuple(s.block for s in bmap)
    if preset == UP_ONLY:
        return tuple(s.block for s in bmap if s.block[0] == "output")
    if preset == VSP_DEFAULT:
        return highest_resolution_up_block(bmap)
    if preset == CUSTOM:
        return parse_blocks(custom, bmap)
    raise ValueError(f"unknown block preset '{preset}'")


def layers_of(bmap: BlockMap, blocks: tuple[BlockId, ...]) -> list[LayerId]:
    return [layer for s in bmap if s.block in blocks for layer in s.layers()]


def unshared_by_level(bmap: BlockMap, level: float) -> set[LayerId]:
    """StyleAligned's `only_self_level`: a regular fraction of the self-attention layers, counted
    in diffusers' processor order (down, up, mid), that stay plain. 0 keeps every layer shared."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"only_self_level {level} must lie in [0, 1]")
    # IP-Adapter key N of a layer is 2·(its position in processor order) + 1 (block_map docstring).
    ordered = sorted(((key - 1) // 2, layer) for s in bmap for key, layer in zip(s.ip_adapter_keys, s.layers()))
    total = len(ordered)
    flip = level > 0.5
    count = int((1.0 - level if flip else level) * total)
    if level == 1.0:
        switched = [True] * total
    elif count == 0:
        switched = [flip] * total
    else:
        switched = [(i % (total // count) == 0) != flip for i in range(total)]
    return {layer for (_, layer), off in zip(ordered, switched) if off}


def resolve_blocks(model_patcher, preset: str, custom: str = "") -> tuple[BlockId, ...]:
    """select_blocks on the model's own block map."""
    return select_blocks(block_map(model_patcher), preset, custom)
