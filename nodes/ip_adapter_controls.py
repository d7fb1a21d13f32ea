"""IP-Adapter with the incumbent IP-Adapter pack's controls: weight types, embeds scaling, per-frame
weights with batch unfold (StyleKit IP-Adapter Advanced) and tiled references (StyleKit IP-Adapter
Tiled). Both run on the same engine and patch as StyleKit IP-Adapter (patching/ip_adapter_controls.py)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..attention.embeds_scaling import EMBEDS_SCALING
from ..ip_adapter.encode import ClipVisionMismatch, check_clip_vision, encode_images
from ..ip_adapter.weight_types import WEIGHT_TYPES
from ..patching.ip_adapter_controls import (MAX_FRAMES, IPAdapterControls, apply_ip_adapter_controlled,
                                            apply_ip_adapter_tiled)
from ._common import DISPLAY_NAMES, category, check_images, check_text_length, node_error
from .ip_adapter import (IPAdapterType, _inject, attn_mask_input, injection_inputs, negative_image_input,
                         settings_from_inputs)

CATEGORY = category("IP-Adapter")
ADVANCED = DISPLAY_NAMES["StyleKitIPAdapterAdvanced"]
TILED = DISPLAY_NAMES["StyleKitIPAdapterTiled"]
MAX_FRAME_WEIGHTS_CHARS = 16 * MAX_FRAMES   # a number and a separator per frame


def control_inputs() -> list:
    return [
        io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default="linear",
                       tooltip="How the weight spreads over the layers, as IP-Adapter Plus's weight types: linear "
                               "(every layer the same, neutral), ease in/out curves, weak/strong blocks, or only the "
                               "style / composition layers. Multiplies the blocks preset. 'precise' types also "
                               "give the unconditional side the image in the other layers."),
        io.Float.Input("weight_composition", default=1.0, min=-1.0, max=5.0, step=0.05,
                       tooltip="'style and composition' types: the weight of the composition layers."),
        io.Combo.Input("embeds_scaling", options=list(EMBEDS_SCALING), default="V only",
                       tooltip="How the weight enters attention: V only (w x image attention, the paper's; neutral), "
                               "K+V (keys and values scaled), with the C penalty (weaker in narrow layers), or "
                               "K+mean(V) with the penalty."),
        io.Boolean.Input("skip_middle_block", default=False,
                         tooltip="Leave the middle block without image, as IP-Adapter Plus does (its middle-block "
                                 "patch is never called); off patches it like every other block."),
    ]


def _controls(node: str, weight_type, weight_composition, embeds_scaling, skip_middle_block,
              frame_weights: str = "", unfold_batch: bool = False) -> IPAdapterControls:
    if weight_type not in WEIGHT_TYPES:
        raise node_error(node, "weight_type", f"choose one of {', '.join(WEIGHT_TYPES)}")
    if embeds_scaling not in EMBEDS_SCALING:
        raise node_error(node, "embeds_scaling", f"choose one of {', '.join(EMBEDS_SCALING)}")
    frames = parse_frame_weights(node, frame_weights)
    return IPAdapterControls(weight_type=weight_type, weight_composition=weight_composition,
                             embeds_scaling=embeds_scaling, frame_weights=frames, unfold_batch=unfold_batch,
                             incumbent_middle=skip_middle_block)


def parse_frame_weights(node: str, text: str) -> tuple[float, ...] | None:
    """"1.0, 0.8, 0.5" -> one weight per latent; empty -> None (the weight input for every latent)."""
    check_text_length(node, "frame_weights", text, MAX_FRAME_WEIGHTS_CHARS)   # before it is split
    items = [x for x in text.replace("\n", ",").split(",") if x.strip()]
    if not items:
        return None
    if len(items) > MAX_FRAMES:
        raise node_error(node, "frame_weights", f"{len(items)} weights; give at most {MAX_FRAMES}")
    try:
        values = tuple(float(x) for x in items)
    except ValueError:
        raise node_error(node, "frame_weights", f"{text.strip()[:60]!r} is not a list of numbers; write e.g. "
                         "'1.0, 0.8, 0.5' (one weight per latent)") from None
    if not all(math.isfinite(v) and -1.0 <= v <= 5.0 for v in values):
        raise node_error(node, "frame_weights", "every weight must be a number from -1 to 5")
    return values


class StyleKitIPAdapterAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitIPAdapterAdvanced",
            display_name=ADVANCED,
            category=CATEGORY,
            description=("StyleKit IP-Adapter with IP-Adapter Plus's controls: weight types (layer-weight curves and "
                         "style / composition layer sets), embeds scaling, and for animation one weight per latent "
                         "and one reference per latent (unfold_batch). Works on a copy of the model."),
            inputs=[io.Model.Input("model"), IPAdapterType.Input("ipadapter"),
                    io.ClipVision.Input("clip_vision", tooltip="Must match the adapter (ViT-H or ViT-bigG)."),
                    io.Image.Input("image", tooltip="One or more reference images (a batch)."),
                    *injection_inputs(), *control_inputs(),
                    io.Boolean.Input("unfold_batch", default=False,
                                     tooltip="Reference i drives latent i (the last reference repeats) instead of "
                                             "every reference driving every latent; off is neutral."),
                    io.String.Input("frame_weights", multiline=True, default="",
                                    tooltip="One weight per latent, e.g. '1.0, 0.8, 0.5' (the last repeats); replaces "
                                            "weight. Empty: weight for every latent."),
                    negative_image_input(), attn_mask_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, start_percent, end_percent, blocks, block_weights,
                combine, weight_type, weight_composition, embeds_scaling, skip_middle_block, unfold_batch,
                frame_weights, negative_image=None, attn_mask=None) -> io.NodeOutput:
        node = ADVANCED
        check_images(node, "image", image)
        check_images(node, "negative_image", negative_image)
        settings = settings_from_inputs(node, weight, start_percent, end_percent, blocks, block_weights, combine,
                                        attn_mask)
        controls = _controls(node, weight_type, weight_composition, embeds_scaling, skip_middle_block, frame_weights,
                             unfold_batch)
        try:
            check_clip_vision(ipadapter, clip_vision)
        except ClipVisionMismatch as err:
            raise node_error(node, "clip_vision", err) from err
        try:
            embeds = encode_images(clip_vision, image, ipadapter.clip_input, negative_image)
        except ValueError as err:
            raise node_error(node, "negative_image", err) from err
        return io.NodeOutput(_inject(node, model, ipadapter, embeds, settings,
                                     lambda m, a, e, s: apply_ip_adapter_controlled(m, a, e, s, controls)))


class StyleKitIPAdapterTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitIPAdapterTiled",
            display_name=TILED,
            category=CATEGORY,
            description=("Image prompt from a large or non-square reference without CLIP's centre crop: the reference "
                         "is cut into square tiles of the CLIP input size (four for a square picture, up to four "
                         "along a long one), each injected with a mask of where it lies, as IP-Adapter Plus's tiled "
                         "node. Generate at the reference's proportions. Outputs the tiles and masks to inspect."),
            inputs=[io.Model.Input("model"), IPAdapterType.Input("ipadapter"),
                    io.ClipVision.Input("clip_vision", tooltip="Must match the adapter (ViT-H or ViT-bigG)."),
                    io.Image.Input("image", tooltip="The reference image (a batch is tiled image by image)."),
                    *injection_inputs(), *control_inputs(),
                    io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="Contrast-adaptive sharpening of the resized reference before tiling "
                                           "(0 = none, neutral)."),
                    io.Image.Input("negative_image", optional=True,
                                   tooltip="Replaces the unconditional reference of every tile."),
                    io.Mask.Input("attn_mask", optional=True,
                                  tooltip="Where the image prompt acts, at the reference's proportions; cut with it.")],
            outputs=[io.Model.Output(), io.Image.Output(display_name="tiles"), io.Mask.Output(display_name="masks")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, start_percent, end_percent, blocks, block_weights,
                combine, weight_type, weight_composition, embeds_scaling, skip_middle_block, sharpening,
                negative_image=None, attn_mask=None) -> io.NodeOutput:
        node = TILED
        check_images(node, "image", image)
        check_images(node, "negative_image", negative_image)
        settings = settings_from_inputs(node, weight, start_percent, end_percent, blocks, block_weights, combine,
                                        attn_mask)
        controls = _controls(node, weight_type, weight_composition, embeds_scaling, skip_middle_block)
        try:
            check_clip_vision(ipadapter, clip_vision)
        except ClipVisionMismatch as err:
            raise node_error(node, "clip_vision", err) from err
        out = {}

        def tiled(m, a, e, s):
            try:
                out["result"] = apply_ip_adapter_tiled(m, a, clip_vision, image, s, controls, sharpening,
                                                       negative_image)
            except ValueError as err:
                if str(err).startswith(node):
                    raise
                raise node_error(node, "image", err) from err
            return out["result"][0]

        patched = _inject(node, model, ipadapter, None, settings, tiled)
        _, tiles, masks = out["result"]
        return io.NodeOutput(patched, tiles, masks)


NODES = [StyleKitIPAdapterAdvanced, StyleKitIPAdapterTiled]
