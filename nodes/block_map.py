"""Inspect a model's attention blocks: every name the ecosystem uses for each one."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..host.block_map import block_map
from ._common import DISPLAY_NAMES, category, node_error


class StyleKitBlockMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitBlockMap",
            display_name=DISPLAY_NAMES["StyleKitBlockMap"],
            category=category("inspect"),
            description=(
                "Lists the model's attention blocks as StyleKit addresses them: ComfyUI block id, "
                "transformer index, diffusers name, channels, heads, depth and the adapter key "
                "numbers of the official files; for Flux and SD3/3.5 also the block-replace key and "
                "which stream comes first in the joint attention. Use it to pick blocks for "
                "per-block weights and block lists."),
            inputs=[io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, Flux.1 or SD3/3.5 model.")],
            outputs=[io.String.Output(display_name="table")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        try:
            table = block_map(model).describe()
        except TypeError as err:
            raise node_error(DISPLAY_NAMES["StyleKitBlockMap"], "model", err) from err
        return io.NodeOutput(table, ui=ui.PreviewText(table))


NODES = [StyleKitBlockMap]
