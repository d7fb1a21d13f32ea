"""InstantStyle content subtraction (Wang et al. 2024, §3.2 and the official code).

c = e_image − s · e_text: the projected CLIP text embedding of a prompt naming the reference's
content is subtracted from the reference's projected CLIP image embedding, both raw (unnormalised)
and in the same CLIP space, before the IP-Adapter projection. The unconditional embeds stay zeros.
Only base adapters read the global embedding, so only they can use it (DESIGN §4).

The text side must come from the text tower paired with the adapter's image tower:
  - SDXL bigG adapters (1280-d): the pooled output of SDXL's second text encoder (CLIP-G), which
    is what an SDXL CONDITIONING carries as `pooled_output`;
  - ViT-H adapters (1024-d): the OpenCLIP ViT-H/14 text tower with its projection, the text
    encoder of SD 2.x, whose CONDITIONING (from core's CLIPLoader, type stable_diffusion, or an
    SD 2.x checkpoint) carries it as `pooled_output`.
"""
from __future__ import annotations

import torch

from .encode import ImageEmbeds
from .model import IMAGE_EMBEDS

CLIP_TEXT_NAME = {1024: "OpenCLIP ViT-H/14 text tower (SD 2.x text encoder)", 1280: "CLIP ViT-bigG/14 text tower (SDXL's CLIP-G)",
                  768: "CLIP ViT-L/14 text tower"}


class ContentSubtractionError(ValueError):
    """The embeds or the text cannot be used for content subtraction; the message says why."""


def pooled_text_embeds(conditioning: list) -> torch.Tensor:
    """The projected pooled text embedding [1, D] of a CONDITIONING's first entry."""
    if not conditioning:
        raise ContentSubtractionError("the conditioning is empty")
    pooled = conditioning[0][1].get("pooled_output")
    if pooled is None:
        raise ContentSubtractionError("the conditioning has no pooled_output (encode the content text with "
                                      "CLIP Text Encode from a CLIP text model)")
    return pooled[:1].float()


def check_subtractable(embeds: ImageEmbeds) -> None:
    """Raise unless the embeds are global image embeds (a base adapter's)."""
    if embeds.source != IMAGE_EMBEDS:
        raise ContentSubtractionError(
            "these embeds are CLIP hidden states, which IP-Adapter plus and full-face models read; content "
            "subtraction works on the global image embedding of a base IP-Adapter (e.g. ip-adapter_sdxl.safetensors, "
            "ip-adapter_sdxl_vit-h.safetensors, ip-adapter_sd15.safetensors)")


def check_text_matches(embeds: ImageEmbeds, text_embeds: torch.Tensor) -> None:
    """Raise unless the text embedding lives in the image embeds' CLIP space (same width)."""
    if text_embeds.shape[-1] != embeds.width:
        needed = CLIP_TEXT_NAME.get(embeds.width, f"a {embeds.width}-d CLIP text tower")
        given = CLIP_TEXT_NAME.get(text_embeds.shape[-1], "another text model")
        raise ContentSubtractionError(
            f"the content text embedding is {text_embeds.shape[-1]}-d ({given}) but the image embeds are "
            f"{embeds.width}-d; encode the content text with the {needed}")


def subtract_content(embeds: ImageEmbeds, text_embeds: torch.Tensor, strength: float) -> ImageEmbeds:
    """e_image − s · e_text for every reference image; uncond unchanged. Shapes: embeds [N, D], text [1, D]."""
    check_subtractable(embeds)
    check_text_matches(embeds, text_embeds)
    cond = embeds.cond - strength * text_embeds.to(embeds.cond.device, embeds.cond.dtype)
    return ImageEmbeds(cond=cond, uncond=embeds.uncond, source=embeds.source)
