"""Images into one batch: what core's ImageBatch did, which ComfyUI 0.33 deprecates for a node
(BatchImagesNode) that older cores lack; the example workflows use this one on every core."""
from __future__ import annotations

import comfy.utils
import torch
from comfy_api.latest import io

from ._common import DISPLAY_NAMES, MAX_REFERENCES, category, check_count

NAME = DISPLAY_NAMES["StyleKitImageBatch"]
SLOTS = 8


class StyleKitImageBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitImageBatch",
            display_name=NAME,
            category=category("image"),
            description=("Joins up to 8 images (or batches) into one batch, in input order, e.g. DreamBooth's subject "
                         "images or several style references. Images of another size are resized to the first "
                         "one's (centre crop), as core's Batch Images does."),
            inputs=[io.Image.Input("image1")] + [io.Image.Input(f"image{i}", optional=True) for i in range(2, SLOTS + 1)],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image1, **more) -> io.NodeOutput:
        images = [image1] + [more[f"image{i}"] for i in range(2, SLOTS + 1) if more.get(f"image{i}") is not None]
        check_count(NAME, "image1", sum(i.shape[0] for i in images), MAX_REFERENCES, "images in all",
                    "join fewer images")
        height, width = image1.shape[1:3]
        same = [i if i.shape[1:3] == (height, width) else
                comfy.utils.common_upscale(i.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
                for i in images]
        channels = min(i.shape[-1] for i in same)
        return io.NodeOutput(torch.cat([i[..., :channels] for i in same]))


NODES = [StyleKitImageBatch]
