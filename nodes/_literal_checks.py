"""The checks each node can make on its literal inputs alone (no model, no image, no file), run by
the validate_inputs that nodes._common.literal_validator gives every node, at /prompt.

Each check raises exactly the node_error the node's execute raises for the same value (they call
the same functions); execute keeps its checks for values that arrive through links. A node id maps
to the inputs its check reads and the check, which gets the literal ones only (a linked or absent
input is missing from `inputs`). Nodes with a `blocks` preset and a `custom_blocks` text share one
check, found from their schema.
"""
from __future__ import annotations

from typing import Callable

from comfy_api.latest import io

from ..host.block_weights import CUSTOM as CUSTOM_WEIGHTS, BlockWeightsError, parse_spec
from ..host.blocks import BlockNameError, check_list_length
from ..host.layer_select import CUSTOM as CUSTOM_BLOCKS
from ..sampling.conditioning import prompt_lines
from ._common import check_percent_order, check_pixels, node_error

Check = Callable[[str, dict], None]


def _percent_order(node: str, inputs: dict) -> None:
    """start_percent after end_percent (IP-Adapter family, style guidance: the same text)."""
    start, end = inputs.get("start_percent"), inputs.get("end_percent")
    if start is not None and end is not None:
        check_percent_order(node, start, end)


def _block_weights(node: str, inputs: dict) -> None:
    if inputs.get("blocks") == CUSTOM_WEIGHTS and "block_weights" in inputs:
        try:
            parse_spec(inputs["block_weights"])
        except BlockWeightsError as err:
            raise node_error(node, "block_weights", err) from err


def _image_prompt(node: str, inputs: dict) -> None:
    _percent_order(node, inputs)
    _block_weights(node, inputs)


def _advanced(node: str, inputs: dict) -> None:
    from .ip_adapter_controls import parse_frame_weights

    _image_prompt(node, inputs)
    if "frame_weights" in inputs:
        parse_frame_weights(node, inputs["frame_weights"])


def _prompt_batch(node: str, inputs: dict) -> None:
    if "text" in inputs:
        try:
            prompt_lines(inputs["text"])
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from err   # as execute: the glue names the input itself


def _words(node: str, inputs: dict, *names: str) -> None:
    from .dreambooth import _text

    for name in names:
        if name in inputs:
            _text(name, inputs[name], node)


def _lora_name(node: str, inputs: dict) -> None:
    from .dreambooth import _lora_name as check

    if "lora_name" in inputs:
        check(inputs["lora_name"], node)


def _class_images(node: str, inputs: dict) -> None:
    _words(node, inputs, "class_noun")
    if all(k in inputs for k in ("count", "width", "height")):
        check_pixels(node, "count", inputs["count"], inputs["height"], inputs["width"])


def _dreambooth(node: str, inputs: dict) -> None:
    from ..training.targets import BLOCK_LIST

    _words(node, inputs, "identifier", "class_noun")
    _lora_name(node, inputs)
    if inputs.get("target_blocks") == BLOCK_LIST and "block_list" in inputs:
        if not inputs["block_list"].strip():
            raise node_error(node, "block_list", "empty while target_blocks is 'block list'; "
                             "name blocks such as 'output 1', or pick another preset")
        try:
            check_list_length(inputs["block_list"])
        except BlockNameError as err:
            raise node_error(node, "block_list", err) from None


def _blora(node: str, inputs: dict) -> None:
    _words(node, inputs, "identifier")
    _lora_name(node, inputs)


def _custom_blocks(node: str, inputs: dict) -> None:
    """StyleAligned / Visual Style Prompting and their samplers: the custom block list's length."""
    if inputs.get("blocks") == CUSTOM_BLOCKS and "custom_blocks" in inputs:
        try:
            check_list_length(inputs["custom_blocks"])
        except BlockNameError as err:
            raise node_error(node, "custom_blocks", err) from err


IMAGE_PROMPT = ("start_percent", "end_percent", "blocks", "block_weights")
CHECKS: dict[str, tuple[tuple[str, ...], Check]] = {
    "StyleKitIPAdapter": (IMAGE_PROMPT, _image_prompt),
    "StyleKitIPAdapterApplyEmbeds": (IMAGE_PROMPT, _image_prompt),
    "StyleKitIPAdapterTiled": (IMAGE_PROMPT, _image_prompt),
    "StyleKitIPAdapterAdvanced": (IMAGE_PROMPT + ("frame_weights",), _advanced),
    "StyleKitStyleAdapter": (IMAGE_PROMPT, _image_prompt),
    "StyleKitStyleGuidance": (("start_percent", "end_percent"), _percent_order),
    "StyleKitStyleGuidanceGuider": (("start_percent", "end_percent"), _percent_order),
    "StyleKitPromptBatch": (("text",), _prompt_batch),
    "StyleKitClassImages": (("class_noun", "count", "width", "height"), _class_images),
    "StyleKitDreamBoothTrain": (("identifier", "class_noun", "lora_name", "target_blocks", "block_list"), _dreambooth),
    "StyleKitBLoRATrain": (("identifier", "lora_name"), _blora),
}


def literal_checks(node_cls: type[io.ComfyNode], schema: io.Schema) -> tuple[tuple[str, ...], Check | None]:
    """The inputs a node's literal check reads and the check (None: only the FLOAT checks)."""
    if schema.node_id in CHECKS:
        return CHECKS[schema.node_id]
    ids = {i.id for i in schema.inputs}
    if {"blocks", "custom_blocks"} <= ids:
        return ("blocks", "custom_blocks"), _custom_blocks
    return (), None
