"""StyleAligned and Visual Style Prompting nodes on DiTs (Flux, SD3/3.5): the same nodes as the UNet
versions; the architecture comes from the model's attention-site map (host/block_map)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..host.block_map import block_map
from ..host.layer_select import ALL, CUSTOM, UP_ONLY
from ..patching.joint_sharing import ALIGNED, OFFSET, JointSharingSettings, install_joint_sharing, resolve_blocks
from ._common import node_error

POSITIONS = [ALIGNED, OFFSET]


def is_dit(model) -> bool:
    try:
        return block_map(model).is_dit
    except TypeError:
        return False


def positions_input() -> io.Combo.Input:
    return io.Combo.Input("reference_positions", options=POSITIONS, default=ALIGNED, optional=True,
                          tooltip="Flux only: the rotary positions of the reference's image keys. aligned: "
                                  "as the target's (each image also leans on the reference's layout); "
                                  "offset: moved one image width aside (the reference is read for its look, "
                                  "not where things are). UNets and SD3 ignore it.")


def dit_blocks(node: str, model, method: str, preset: str, custom: str) -> tuple:
    """The preset / custom_blocks pair on a DiT: custom (empty = the method's published or StyleKit
    default, patching/joint_sharing.py), all, or the VSP default preset = the method's default."""
    if preset == UP_ONLY:
        raise node_error(node, "blocks", f"'{UP_ONLY}' names UNet blocks and this model is a DiT; choose "
                         f"'{CUSTOM}' (empty custom_blocks gives the default blocks) or '{ALL}'")
    text = "all" if preset == ALL else (custom if preset == CUSTOM else "")
    try:
        return resolve_blocks(model, text, method)
    except (ValueError, TypeError, KeyError) as err:
        raise node_error(node, "custom_blocks", err) from err


def install_dit(node: str, model, method: str, preset: str, custom: str, **settings):
    positions = settings.pop("reference_positions", None) or ALIGNED
    if positions not in POSITIONS:
        raise node_error(node, "reference_positions", f"'{positions}' is not one of {', '.join(POSITIONS)}; pick one")
    for name, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise node_error(node, name, f"{value} is not a finite number; enter a number")
    blocks = dit_blocks(node, model, method, preset, custom)
    try:
        return install_joint_sharing(model, JointSharingSettings(method, blocks, reference_positions=positions,
                                                                 **settings))
    except (ValueError, TypeError) as err:
        raise node_error(node, "model", err) from err
