"""Block presets and custom block lists for the self-attention methods, resolved on the block map.

Users name blocks by ComfyUI id ("output 3", "input 8", "middle 0") or by diffusers name
("up_blocks.1" = every attention of that up block, "up_blocks.1.attentions.0", "mid_block");
presets are resolved on the loaded model's map, never from a hard-coded table.
"""
from __future__ import annotations

import re

from .block_map import BlockId, BlockMap, LayerId, block_map
from .echo import echo

ALL = "all"
UP_ONLY = "up blocks only"
VSP_DEFAULT = "highest-resolution up block"
CUSTOM = "custom"

_COMFY_ID = re.compile(r"^(input|middle|output)[\s_]*(\d+)?$")
MAX_LIST_CHARS = 4_000   # every SDXL block by diffusers name is ~600 characters; checked before parsing


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
    """Blocks named in a comma- or newline-separated list; ValueError names any unknown entry."""
    if len(text) > MAX_LIST_CHARS:
        raise ValueError(f"the block list is {len(text)} characters long, beyond the limit of {MAX_LIST_CHARS}; "
                         "name blocks such as 'output 3, output 4'")
    chosen: list[BlockId] = []
    for raw in re.split(r"[,;\n]+", text):
        entry = raw.strip().lower()
        if not entry:
            continue
        match = _COMFY_ID.match(entry)
        if match:
            name, number = match.group(1), match.group(2)
            found = [s.block for s in bmap if s.block[0] == name and (number is None or s.block[1] == int(number))]
        else:
            found = [s.block for s in bmap if s.diffusers_name == entry or s.diffusers_name.startswith(entry + ".")]
        if not found:
            known = ", ".join(f"{b} {n}" for b, n in (s.block for s in bmap))
            raise ValueError(f"{echo(raw.strip())} is not an attention block of this model; it has: {known} "
                             "(diffusers names such as up_blocks.1 work too)")
        chosen.extend(b for b in found if b not in chosen)
    if not chosen:
        raise ValueError("the custom block list is empty; name blocks such as 'output 3, output 4'")
    return tuple(chosen)


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
