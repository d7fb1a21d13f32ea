"""IP-Adapter nodes: load an adapter, encode reference images, inject them into a model.

Graph shapes:
  Loader + Load CLIP Vision + Load Image -> StyleKit IP-Adapter -> KSampler           (one node)
  ... -> StyleKit IP-Adapter Encode -> [embeds transforms] -> StyleKit IP-Adapter Apply Embeds
The embeds (STYLEKIT_IMAGE_EMBEDS) are CLIP vision features with their unconditional twin;
transform nodes such as InstantStyle's content subtraction sit between Encode and Apply.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..ip_adapter.encode import COMBINE, ImageEmbeds, ClipVisionMismatch, CombineError, check_clip_vision, encode_images
from ..ip_adapter.files import ip_adapter_files, load_ip_adapter
from ..ip_adapter.model import IPAdapterFileError
from ..host.block_weights import ALL, CUSTOM, PRESETS, BlockWeightsError
from ..dit_adapters.files import load_dit_adapter
from ..dit_adapters.instantx_sd35 import InstantXSD35Adapter
from ..dit_adapters.xlabs_flux import XLabsFluxAdapter
from ..patching.flux_ip_adapter import apply_flux_ip_adapter_embeds, refuse_unet_adapter_on_dit
from ..patching.sd35_ip_adapter import apply_sd35_ip_adapter_embeds
from ..patching.ip_adapter import AdapterMismatch, IPAdapterSettings, apply_ip_adapter_embeds
from ._common import DISPLAY_NAMES, MAX_REFERENCES, category, check_images, check_percent_order, node_error

IPAdapterType = io.Custom("STYLEKIT_IPADAPTER")
ImageEmbedsType = io.Custom("STYLEKIT_IMAGE_EMBEDS")

CATEGORY = category("IP-Adapter")


def _inject(node: str, model, ipadapter, embeds, settings: IPAdapterSettings, apply=apply_ip_adapter_embeds):
    try:
        if isinstance(ipadapter, (XLabsFluxAdapter, InstantXSD35Adapter)) and apply is not apply_ip_adapter_embeds:
            raise AdapterMismatch(f"{ipadapter.name} is a DiT (Flux / SD3.5) IP-Adapter; this node's controls are for "
                                  "UNet adapters: use StyleKit IP-Adapter or IP-Adapter Apply Embeds")
        if isinstance(ipadapter, XLabsFluxAdapter):
            return apply_flux_ip_adapter_embeds(model, ipadapter, embeds, settings)
        if isinstance(ipadapter, InstantXSD35Adapter):
            return apply_sd35_ip_adapter_embeds(model, ipadapter, embeds, settings)
        refuse_unet_adapter_on_dit(ipadapter, model)
        return apply(model, ipadapter, embeds, settings)
    except AdapterMismatch as err:
        raise node_error(node, "ipadapter", err) from err
    except BlockWeightsError as err:
        raise node_error(node, "block_weights" if settings.blocks == CUSTOM else "blocks", err) from err
    except ClipVisionMismatch as err:
        raise node_error(node, "embeds", err) from err
    except CombineError as err:
        raise node_error(node, "combine", err) from err


def _encode_for(ipadapter, clip_vision, image, negative_image, crop: bool = True) -> ImageEmbeds:
    """The reference images' embeds with the uncond of the adapter's reference pipeline unless a negative
    image is given: zero features for InstantX SD3.5 (diffusers; no zero image is encoded), a black
    image's embedding for XLabs Flux (diffusers' Flux pipeline), zeros / a zero image for the others."""
    reference_uncond = negative_image is None
    return encode_images(clip_vision, image, ipadapter.clip_input, negative_image, crop=crop,
                         zero_uncond=reference_uncond and isinstance(ipadapter, InstantXSD35Adapter),
                         black_uncond=reference_uncond and isinstance(ipadapter, XLabsFluxAdapter))


def _mask_frames(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else (mask[None] if mask.ndim == 2 else mask)


def settings_from_inputs(node: str, weight, start_percent, end_percent, blocks, block_weights, combine,
                         attn_mask=None) -> IPAdapterSettings:
    check_percent_order(node, start_percent, end_percent)
    if blocks not in PRESETS:
        raise node_error(node, "blocks", f"unknown preset {blocks!r}; choose one of {', '.join(PRESETS)}")
    if combine not in COMBINE:
        raise node_error(node, "combine", f"choose one of {', '.join(COMBINE)}")
    return IPAdapterSettings(weight=weight, start_percent=start_percent, end_percent=end_percent, blocks=blocks,
                             block_weights=block_weights, combine=combine, attn_mask=_mask_frames(attn_mask), node=node)


def negative_image_input():
    return io.Image.Input("negative_image", optional=True,
                          tooltip="Replaces the unconditional reference (one image, or one per reference).")


def attn_mask_input():
    return io.Mask.Input("attn_mask", optional=True,
                         tooltip="Where the image prompt acts (1) and where not (0); one mask or one per latent.")


def injection_inputs() -> list:
    """The inputs every apply node shares, in graph order after the adapter and image inputs."""
    return [
        io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                       tooltip="Strength of the image prompt; 0 leaves the model unchanged (neutral)."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Fraction of sampling after which the image prompt starts (0 = from the first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Fraction of sampling after which it stops (1 = until the last step)."),
        io.Combo.Input("blocks", options=list(PRESETS), default=ALL,
                       tooltip="Which attention blocks get the image: every block (original IP-Adapter), InstantStyle's "
                               "style block, style + layout blocks, layout block, or the custom block_weights."),
        io.String.Input("block_weights", multiline=True, default="",
                        tooltip=f"With blocks = '{CUSTOM}': a weight per block, e.g. {{\"output 1\": 1.0}} or "
                                "diffusers' {\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}; a list per block gives one "
                                "value per transformer layer. Unnamed blocks get 0. Keys are block names as in "
                                "every StyleKit node ('output 3-5', 'output' = every output block, 'up_blocks.1'); "
                                "a plain list 'output 1, input 8' gives them weight 1."),
        io.Combo.Input("combine", options=list(COMBINE), default="concat",
                       tooltip="Several reference images: concat their tokens (each image counts), average their "
                               "CLIP features into one reference, or joint: one token set read from all references' "
                               "CLIP patch tokens at once (StyleAdapter; plus / full-face / StyleAdapter models)."),
    ]


class StyleKitIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitIPAdapterLoader",
            display_name=DISPLAY_NAMES["StyleKitIPAdapterLoader"],
            category=CATEGORY,
            description=("Loads an official IP-Adapter file from models/ipadapter (.safetensors or .bin), or a "
                         "StyleAdapter checkpoint in the layout the README documents. The type (base, plus, full-face, "
                         "styleadapter), the base model (SD1.5, SDXL, or Flux for XLabs' flux-ip-adapter files) and "
                         "the CLIP vision model it needs are read from the tensor shapes, not the file name."),
            inputs=[io.Combo.Input("ipadapter_file", options=ip_adapter_files(),
                                   tooltip="A file in models/ipadapter, e.g. ip-adapter_sd15.safetensors.")],
            outputs=[IPAdapterType.Output(display_name="ipadapter")],
        )

    @classmethod
    def execute(cls, ipadapter_file) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_ip_adapter(ipadapter_file))
        except IPAdapterFileError as err:
            try:   # a DiT adapter (XLabs Flux, InstantX SD3.5), told apart by its tensor shapes
                return io.NodeOutput(load_dit_adapter(ipadapter_file))
            except Exception:   # not a DiT adapter either, or unreadable: the first reason is the one to show
                raise node_error(DISPLAY_NAMES["StyleKitIPAdapterLoader"], "ipadapter_file",
                                 f"{ipadapter_file} is not a usable IP-Adapter: {err}; choose an official IP-Adapter "
                                 "file (image_proj.* and ip_adapter.* weights)") from err
        except FileNotFoundError as err:
            raise node_error(DISPLAY_NAMES["StyleKitIPAdapterLoader"], "ipadapter_file",
                             f"{ipadapter_file} is not a usable IP-Adapter: {err}; choose an official IP-Adapter "
                             "file (image_proj.* and ip_adapter.* weights)") from err


class StyleKitIPAdapterEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitIPAdapterEncode",
            display_name=DISPLAY_NAMES["StyleKitIPAdapterEncode"],
            category=CATEGORY,
            description=("Encodes reference images with CLIP vision into the features this adapter reads (image "
                         "embeds for base adapters, penultimate hidden states for plus / full-face), with their "
                         "unconditional twin: zeros for base, a zero (mean-grey) image for plus, or the negative "
                         "image. Feed the embeds to StyleKit IP-Adapter Apply Embeds, or transform them first."),
            inputs=[
                IPAdapterType.Input("ipadapter"),
                io.ClipVision.Input("clip_vision", tooltip="Must match the adapter: ViT-H for most SD1.5 and *_vit-h "
                                                           "adapters, ViT-bigG for ip-adapter_sdxl."),
                io.Image.Input("image", tooltip="One or more reference images (a batch)."),
                io.Combo.Input("crop", options=["center", "none"], default="center",
                               tooltip="center: resize the short side to 224 and crop the middle (as the reference "
                                       "processor); none: squash the whole image to 224x224."),
                negative_image_input(),
            ],
            outputs=[ImageEmbedsType.Output(display_name="embeds")],
        )

    @classmethod
    def execute(cls, ipadapter, clip_vision, image, crop, negative_image=None) -> io.NodeOutput:
        node = DISPLAY_NAMES["StyleKitIPAdapterEncode"]
        check_images(node, "image", image, MAX_REFERENCES)
        check_images(node, "negative_image", negative_image, MAX_REFERENCES)
        try:
            check_clip_vision(ipadapter, clip_vision)
        except ClipVisionMismatch as err:
            raise node_error(node, "clip_vision", err) from err
        try:
            embeds = _encode_for(ipadapter, clip_vision, image, negative_image, crop=crop == "center")
        except ValueError as err:
            raise node_error(node, "negative_image", err) from err
        return io.NodeOutput(embeds)


class StyleKitIPAdapterApplyEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitIPAdapterApplyEmbeds",
            display_name=DISPLAY_NAMES["StyleKitIPAdapterApplyEmbeds"],
            category=CATEGORY,
            description=("Injects encoded reference images into the model's cross-attention (decoupled "
                         "cross-attention: text attention + weight x image attention) in the chosen blocks. Works on "
                         "a copy of the model and stacks with other adapters and attention patches."),
            inputs=[io.Model.Input("model"), IPAdapterType.Input("ipadapter"), ImageEmbedsType.Input("embeds"),
                    *injection_inputs(),
                    attn_mask_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, embeds, weight, start_percent, end_percent, blocks, block_weights, combine,
                attn_mask=None) -> io.NodeOutput:
        node = DISPLAY_NAMES["StyleKitIPAdapterApplyEmbeds"]
        settings = settings_from_inputs(node, weight, start_percent, end_percent, blocks, block_weights, combine,
                                        attn_mask)
        return io.NodeOutput(_inject(node, model, ipadapter, embeds, settings))


class StyleKitIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitIPAdapter",
            display_name=DISPLAY_NAMES["StyleKitIPAdapter"],
            category=CATEGORY,
            description=("Image prompt in one node: encodes the reference image(s) with CLIP vision and injects them "
                         "into the chosen cross-attention blocks (IP-Adapter; with the InstantStyle presets, only the "
                         "style and/or layout blocks). Works on a copy of the model; stacks with other adapters."),
            inputs=[io.Model.Input("model"), IPAdapterType.Input("ipadapter"),
                    io.ClipVision.Input("clip_vision", tooltip="Must match the adapter (ViT-H or ViT-bigG; ViT-L/14 for "
                                                               "XLabs Flux, SigLIP so400m for InstantX SD3.5)."),
                    io.Image.Input("image", tooltip="One or more reference images (a batch)."),
                    *injection_inputs(),
                    negative_image_input(),
                    attn_mask_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, start_percent, end_percent, blocks, block_weights,
                combine, negative_image=None, attn_mask=None) -> io.NodeOutput:
        node = DISPLAY_NAMES["StyleKitIPAdapter"]
        check_images(node, "image", image, MAX_REFERENCES)
        check_images(node, "negative_image", negative_image, MAX_REFERENCES)
        settings = settings_from_inputs(node, weight, start_percent, end_percent, blocks, block_weights, combine,
                                        attn_mask)
        try:
            check_clip_vision(ipadapter, clip_vision)
        except ClipVisionMismatch as err:
            raise node_error(node, "clip_vision", err) from err
        try:
            embeds = _encode_for(ipadapter, clip_vision, image, negative_image)
        except ValueError as err:
            raise node_error(node, "negative_image", err) from err
        return io.NodeOutput(_inject(node, model, ipadapter, embeds, settings))


NODES = [StyleKitIPAdapterLoader, StyleKitIPAdapter, StyleKitIPAdapterEncode, StyleKitIPAdapterApplyEmbeds]
