"""One prompt per latent row: the conditioning the batch-sharing methods want."""
from __future__ import annotations

from comfy_api.latest import io

from ..sampling.conditioning import encode_lines
from ._common import DISPLAY_NAMES, category

NAME = DISPLAY_NAMES["StyleKitPromptBatch"]


class StyleKitPromptBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitPromptBatch",
            display_name=NAME,
            category=category("conditioning"),
            description=(
                "Encodes one prompt per line into one conditioning whose rows follow the lines: image i of "
                "the latent batch gets line i. Connect batch_size (the number of lines) to the latent's batch size. For "
                "StyleAligned and Visual Style Prompting the first line is the reference image's prompt."),
            inputs=[
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="One prompt per line; empty lines are skipped."),
            ],
            outputs=[io.Conditioning.Output(), io.Int.Output(display_name="batch_size")],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        try:
            conditioning = encode_lines(clip, text)
        except ValueError as err:
            raise ValueError(f"{NAME}: {err}") from err  # the glue names the input itself
        return io.NodeOutput(conditioning, conditioning[0][0].shape[0])


NODES = [StyleKitPromptBatch]
