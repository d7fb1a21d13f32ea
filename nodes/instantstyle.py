"""InstantStyle: content subtraction on encoded reference images (the block presets live in the
IP-Adapter nodes' `blocks` input)."""
from __future__ import annotations

from comfy_api.latest import io

from ..ip_adapter.content import (ContentSubtractionError, check_subtractable, check_text_matches,
                                  pooled_text_embeds, subtract_content)
from ._common import DISPLAY_NAMES, category, node_error
from .ip_adapter import ImageEmbedsType


class StyleKitInstantStyleContentSubtraction(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitInstantStyleContentSubtraction",
            display_name=DISPLAY_NAMES["StyleKitInstantStyleContentSubtraction"],
            category=category("IP-Adapter"),
            description=("InstantStyle: subtracts the CLIP text embedding of the reference's content (e.g. 'a house') "
                         "from its CLIP image embedding, so the adapter passes on the style and less of the subject. "
                         "Base IP-Adapters only. The content conditioning must come from the text tower paired with "
                         "the image tower: SDXL's CLIP Text Encode for bigG adapters (ip-adapter_sdxl), the OpenCLIP "
                         "ViT-H text model (CLIPLoader, type stable_diffusion) for ViT-H adapters."),
            inputs=[
                ImageEmbedsType.Input("embeds", tooltip="From StyleKit IP-Adapter Encode with a base adapter."),
                io.Conditioning.Input("content", tooltip="The encoded content text; its pooled output is subtracted."),
                io.Float.Input("strength", default=0.5, min=0.0, max=2.0, step=0.05,
                               tooltip="s in e_image - s * e_text; 0 leaves the embeds unchanged (neutral). The "
                                       "official demo uses 0.5, the SD1.5 example 0.8."),
            ],
            outputs=[ImageEmbedsType.Output(display_name="embeds")],
        )

    @classmethod
    def execute(cls, embeds, content, strength) -> io.NodeOutput:
        node = DISPLAY_NAMES["StyleKitInstantStyleContentSubtraction"]
        try:
            check_subtractable(embeds)
        except ContentSubtractionError as err:
            raise node_error(node, "embeds", err) from err
        try:
            text = pooled_text_embeds(content)
            check_text_matches(embeds, text)
        except ContentSubtractionError as err:
            raise node_error(node, "content", err) from err
        return io.NodeOutput(subtract_content(embeds, text, strength))


NODES = [StyleKitInstantStyleContentSubtraction]
