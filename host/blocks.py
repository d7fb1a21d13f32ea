"""The block grammar: one way to name attention sites, read by one parser for every node that takes
blocks (IP-Adapter block_weights, StyleAligned / Visual Style Prompting custom_blocks, DreamBooth /
B-LoRA block lists). Names resolve on the loaded model's site map (block_map), never on a table.

A block list is entries separated by commas, semicolons or new lines; each entry is one of
  - a ComfyUI id: "input 8", "output_1", "middle 0"; DiT blocks "double 3", "single 12",
    "joint 5" (SD3), or core's block-replace names "double_block 3", "single_block 12" (on SD3,
    "double N" is joint block N: core keys it ("double_block", N));
  - a range of them, both ends included: "output 3-5", "double 0-18", "single 0-37";
  - a bare kind, meaning every block of that kind: "output", "input", "middle", "double", "single";
  - a diffusers module name or any prefix of one: "up_blocks.0.attentions.1", "up_blocks.1" (its
    attentions), "mid_block" (also "mid"), "down_blocks", "transformer_blocks.4",
    "single_transformer_blocks"; a leading "unet." or "transformer." (diffusers / kohya LoRA keys)
    is ignored;
  - "all": every site.
Matching is case-insensitive and linear in the entry and the number of sites. An entry that names
nothing raises BlockNameError listing what the model has.

One meaning where the old parsers disagreed: a bare kind ("output") is every block of that kind in
every node (IP-Adapter's block_weights used to read it as "output 0"); diffusers prefixes
("up_blocks.1", "mid_block") work as DreamBooth / B-LoRA targets too.
"""
from __future__ import annotations

import re
from typing import Iterable

from .block_map import AttentionSite, BlockMap
from .echo import echo

MAX_ENTRY = 200          # characters of one entry: more is not a block name
MAX_LIST_CHARS = 4_000   # a whole list: every SDXL block by diffusers name is ~600; checked before parsing
_SEPARATORS = re.compile(r"[,;\n]")
# kind words (letters with single underscores), then optionally a number or an inclusive range
_ID = re.compile(r"([a-z]+(?:_[a-z]+)*)(?:[ _]*(\d{1,4})(?: *- *(\d{1,4}))?)?")
_ALIASES = {"mid": "mid_block"}


class BlockNameError(ValueError):
    """A block name that names no attention site of this model."""


def _kind_matches(kind: str, site: AttentionSite) -> bool:
    patch_kind = site.patch_key[0] if site.patch_key else site.block[0]
    return kind in (site.block[0], patch_kind) or f"{kind}_block" == patch_kind


def _known(bm: BlockMap) -> str:
    return ", ".join(f"{s.block[0]} {s.block[1]} ({s.diffusers_name})" for s in bm)


def sites_named(bm: BlockMap, entry: str) -> list[AttentionSite]:
    """The sites one entry names, in map order (module docstring)."""
    name = entry.strip().lower()
    if len(name) > MAX_ENTRY:
        raise BlockNameError(f"{echo(name)} is too long for a block name (at most {MAX_ENTRY} characters)")
    if name == "all":
        return list(bm)
    match = _ID.fullmatch(name)
    found: list[AttentionSite] = []
    if match and any(_kind_matches(match[1], s) for s in bm):
        kind, first, last = match[1], match[2], match[3]
        low = int(first) if first is not None else None
        high = int(last) if last is not None else low
        found = [s for s in bm if _kind_matches(kind, s) and (low is None or low <= s.block[1] <= high)]
    elif name:
        prefix = name.removeprefix("unet.").removeprefix("transformer.").rstrip(".")
        prefix = _ALIASES.get(prefix, prefix)
        found = [s for s in bm if s.diffusers_name == prefix or s.diffusers_name.startswith(prefix + ".")]
    if not found:
        raise BlockNameError(f"'{entry.strip()}' names no attention block of this model; it has: {_known(bm)} "
                             "(diffusers prefixes such as up_blocks.1 work too; see StyleKit Block Map)")
    return found


def split_entries(text: str) -> list[str]:
    return [part.strip() for part in _SEPARATORS.split(text) if part.strip()]


def check_list_length(text: str) -> None:
    """The bound on a block list's text, checked before it is split (no model needed)."""
    if len(text) > MAX_LIST_CHARS:
        raise BlockNameError(f"the block list is {len(text)} characters long, beyond the limit of {MAX_LIST_CHARS}; "
                             "name blocks such as 'output 3, output 4'")


def parse_block_list(bm: BlockMap, text: str | Iterable[str]) -> list[AttentionSite]:
    """The sites a block list names, each once, in the order first named; empty lists are refused."""
    if isinstance(text, str):
        check_list_length(text)
    entries = split_entries(text) if isinstance(text, str) else [str(e) for e in text]
    chosen: dict[tuple, AttentionSite] = {}
    for entry in entries:
        for site in sites_named(bm, entry):
            chosen.setdefault(site.block, site)
    if not chosen:
        raise BlockNameError("the block list is empty; name blocks such as 'output 1, input 8' or "
                             "'up_blocks.0.attentions.1'")
    return list(chosen.values())
