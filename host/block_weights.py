"""Per-block weights: presets and user dicts resolved to one weight per attention layer, through
the model's block map (DESIGN §2), so a block name always lands on the layer ComfyUI calls.

Accepted forms (any mix of scalars and lists, as JSON or a Python literal):

1. diffusers' `set_ip_adapter_scale` dict, with its semantics: keys "down", "mid", "up";
   "block_i" names diffusers' down_blocks.i / up_blocks.i; a list gives one value per
   `attentions.j` of that block, a scalar all of them; every block not named gets 0.
       {"up": {"block_0": [0.0, 1.0, 0.0]}, "down": {"block_2": [0.0, 1.0]}}
2. Named blocks, each key in the block grammar of host/blocks.py (ComfyUI ids and ranges,
   "output" = every output block, diffusers names and prefixes, DiT blocks); blocks not named
   get 0. A plain block list (not JSON) gives its blocks weight 1.
       {"output 1": 1.0, "input 8": 0.5}        output 1, input 8
3. Per transformer depth (SDXL's 10-deep blocks): wherever a block takes a number it also takes
   a list with one value per transformer layer of its depth.
       {"output 1": [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]}   {"up": {"block_0": [0.0, [1.0] * 10, 0.0]}}

Presets follow InstantStyle (paper + official code): SDXL style = up_blocks.0.attentions.1
(output 1), layout = down_blocks.2.attentions.1 (input 8); SD1.5 (official infer_style_sd15.py)
style = up_blocks.1 (output 3, 4, 5), style + layout = down_blocks.2 + mid_block + up_blocks.1.
SD1.5 "layout" is that last set without the style block (our derivation; InstantStyle names no
SD1.5 layout-only set).
"""
from __future__ import annotations

import ast
import json
import re
from typing import Union

from .block_map import AttentionSite, BlockMap, LayerId
from .blocks import BlockNameError, sites_named, split_entries
from .echo import echo

Spec = Union[dict, float, int, None]

ALL = "all blocks"
STYLE = "InstantStyle style"
STYLE_LAYOUT = "InstantStyle style + layout"
LAYOUT = "InstantStyle layout"
CUSTOM = "custom (block_weights)"
PRESETS = (ALL, STYLE, STYLE_LAYOUT, LAYOUT, CUSTOM)

# By topology: "sdxl" when up_blocks.0 has attentions (SDXL and its relatives), else "sd15".
_PRESET_SPECS: dict[str, dict[str, Spec]] = {
    "sdxl": {
        ALL: 1.0,
        STYLE: {"up": {"block_0": [0.0, 1.0, 0.0]}},
        STYLE_LAYOUT: {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
        LAYOUT: {"down": {"block_2": [0.0, 1.0]}},
    },
    "sd15": {
        ALL: 1.0,
        STYLE: {"up": {"block_1": 1.0}},
        STYLE_LAYOUT: {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}},
        LAYOUT: {"down": {"block_2": 1.0}, "mid": 1.0},
    },
}


class BlockWeightsError(ValueError):
    """A block weight spec names no block of this model, or has the wrong shape for it."""


def topology(bm: BlockMap) -> str:
    return "sdxl" if any(s.diffusers_name.startswith("up_blocks.0.") for s in bm) else "sd15"


def preset_spec(bm: BlockMap, preset: str) -> Spec:
    """The diffusers-style dict of a preset for this model's topology."""
    if preset not in _PRESET_SPECS["sd15"]:
        raise BlockWeightsError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS[:-1])}")
    return _PRESET_SPECS[topology(bm)][preset]


# The longest spec text read: a per-depth list for every SDXL layer is ~1,000 characters. Checked
# before parsing, so a megabyte of text is refused at once.
MAX_SPEC_CHARS = 20_000


def parse_spec(text: str) -> Spec:
    """A block weight spec from text: JSON or a Python literal, or a plain block list (weight 1 for
    each block named, e.g. "output 1, input 8"); empty text is None."""
    if len(text) > MAX_SPEC_CHARS:
        raise BlockWeightsError(f"the text is {len(text)} characters long, beyond the limit of {MAX_SPEC_CHARS}; "
                                "name blocks in a short dict such as {\"output 1\": 1.0}")
    text = text.strip()
    if not text:
        return None
    if text[0] not in "{[(-+.0123456789":   # not a literal: a block list in the grammar of host/blocks.py
        return {entry: 1.0 for entry in split_entries(text)}
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as err:
        raise BlockWeightsError(f"cannot read it as JSON or a Python dict ({err.__class__.__name__}: {err})") from None


WEIGHT_RANGE = (-1.0, 5.0)   # as the apply nodes' global weight: beyond it the image swamps the text


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BlockWeightsError(f"{where}: expected a number, got {echo(value)}")
    low, high = WEIGHT_RANGE
    if not low <= value <= high:  # also refuses NaN
        raise BlockWeightsError(f"{where}: weight {value} is out of range; use {low} to {high}")
    return float(value)


def _site_weights(site: AttentionSite, value, where: str) -> dict[LayerId, float]:
    """One value for a whole transformer, or a list with one value per transformer depth."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        elif len(value) != site.depth:
            raise BlockWeightsError(f"{where}: {site.diffusers_name} ({site.block[0]} {site.block[1]}) has "
                                    f"{site.depth} transformer layers, got {len(value)} values")
        else:
            return {layer: _number(v, where) for layer, v in zip(site.layers(), value)}
    w = _number(value, where)
    return {layer: w for layer in site.layers()}


def _blocks(bm: BlockMap, side: str) -> dict[int, list[AttentionSite]]:
    """diffusers block number -> its attention sites in `attentions.j` order, for "down" or "up"."""
    out: dict[int, list[AttentionSite]] = {}
    for s in bm:
        parts = s.diffusers_name.split(".")
        if parts[0] == f"{side}_blocks":
            out.setdefault(int(parts[1]), []).append(s)
    return out


def _diffusers_form(bm: BlockMap, spec: dict) -> dict[LayerId, float]:
    weights: dict[LayerId, float] = {}
    mid = [s for s in bm if s.block[0] == "middle"]
    if "mid" in spec:
        if not mid:
            raise BlockWeightsError("'mid': this model has no middle attention block")
        weights.update(_site_weights(mid[0], spec["mid"], "'mid'"))
    for side in ("down", "up"):
        if side not in spec:
            continue
        blocks = _blocks(bm, side)
        value = spec[side]
        if not isinstance(value, dict):  # {"down": 1.0}: every attention of every down block
            value = {f"block_{b}": value for b in blocks}
        for name, per_block in value.items():
            match = re.fullmatch(r"block_(\d+)", str(name))
            if not match or int(match[1]) not in blocks:
                have = ", ".join(f"block_{b}" for b in blocks)
                raise BlockWeightsError(f"{echo(f'{side}.{name}')}: {side}_blocks with attention in this model are {have}")
            sites = blocks[int(match[1])]
            where = echo(f"{side}.{name}")
            if isinstance(per_block, (list, tuple)) and len(per_block) != 1:
                if len(per_block) != len(sites):
                    raise BlockWeightsError(f"{where}: {side}_blocks.{match[1]} has {len(sites)} attentions, "
                                            f"got {len(per_block)} values")
                for j, (site, v) in enumerate(zip(sites, per_block)):
                    weights.update(_site_weights(site, v, f"{where}[{j}]"))
            else:
                for site in sites:
                    weights.update(_site_weights(site, per_block, where))
    return weights


def _named_form(bm: BlockMap, spec: dict) -> dict[LayerId, float]:
    weights: dict[LayerId, float] = {}
    for name, value in spec.items():
        try:
            sites = sites_named(bm, str(name))
        except BlockNameError as err:
            raise BlockWeightsError(str(err)) from None
        for site in sites:
            weights.update(_site_weights(site, value, echo(str(name))))
    return weights


def resolve_block_weights(bm: BlockMap, spec: Spec) -> dict[LayerId, float]:
    """One weight per attention layer of the model (every layer present, 0 where not named).

    spec: a number (every layer), a diffusers-style dict, a named-block dict (module docstring),
    or None (every layer 1.0, the original IP-Adapter).
    """
    layers = bm.layers()
    if spec is None:
        return {layer: 1.0 for layer in layers}
    if not isinstance(spec, dict):
        w = _number(spec, "block weights")
        return {layer: w for layer in layers}
    keys = set(spec)
    if keys and keys <= {"down", "mid", "up"}:
        named = _diffusers_form(bm, spec)
    else:
        named = _named_form(bm, spec)
    return {layer: named.get(layer, 0.0) for layer in layers}


def block_weights_for(bm: BlockMap, preset: str, custom: str | Spec = "") -> dict[LayerId, float]:
    """The weights of a preset, or of the custom spec (text or dict) when preset is CUSTOM."""
    if preset == CUSTOM:
        spec = parse_spec(custom) if isinstance(custom, str) else custom
        if spec is None:
            raise BlockWeightsError(f"preset '{CUSTOM}' needs a spec, e.g. {{\"output 1\": 1.0}}")
        return resolve_block_weights(bm, spec)
    if isinstance(custom, str) and custom.strip():
        raise BlockWeightsError(f"block weights are given but the preset is '{preset}'; choose '{CUSTOM}' "
                                "to use them, or clear them")
    return resolve_block_weights(bm, preset_spec(bm, preset))
