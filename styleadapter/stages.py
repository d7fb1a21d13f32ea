"""StyleAdapter on the IP-Adapter engine: the decoupling strategies between the encode stages, then
the two-path cross-attention through patching.ip_adapter (no second patch):

    IMAGE --shuffle_patches--> IMAGE --encode_images--> ImageEmbeds --remove_class_token-->
    ImageEmbeds --image_tokens(combine)--> ImageTokens --apply_ip_adapter--> MODEL clone

Works with every adapter the pack loads: IP-Adapter base (shuffle, concat / average only), plus
and full-face (all three strategies), StyleAdapter checkpoints (ip_adapter/style_projection.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ip_adapter.encode import ImageEmbeds, ImageTokens, encode_images, image_tokens
from ..ip_adapter.model import IMAGE_EMBEDS, IPAdapter
from ..patching.ip_adapter import IPAdapterSettings, apply_ip_adapter
from .decoupling import drop_class_token, shuffle_patches


class ClassTokenError(ValueError):
    """The embeds have no class token to remove; the message says why."""


def check_has_class_token(source: str, class_token: bool = True) -> None:
    """Raise ClassTokenError unless features of this source still carry a class token to remove."""
    if source == IMAGE_EMBEDS:
        raise ClassTokenError(
            "these embeds are the global (pooled) CLIP image embedding that base IP-Adapters read, which has no "
            "class token to remove; class-token removal works with token-sequence adapters (IP-Adapter plus, "
            "full-face, StyleAdapter)")
    if not class_token:
        raise ClassTokenError("the class token was already removed from these embeds; remove it once")


def remove_class_token(embeds: ImageEmbeds) -> ImageEmbeds:
    """The embeds without the CLIP class token: [N, 257, H] -> [N, 256, H] for cond and uncond.

    Raises ClassTokenError for global image embeds (base adapters: the pooled embedding has no
    token to drop) and for embeds whose class token is already gone."""
    check_has_class_token(embeds.source, embeds.class_token)
    return ImageEmbeds(cond=drop_class_token(embeds.cond), uncond=drop_class_token(embeds.uncond),
                       source=embeds.source, class_token=False)


@dataclass(frozen=True)
class StyleAdapterSettings:
    style_scale: float = 1.0               # λ of the style path (times the per-block weights)
    shuffle_grid: int = 1                  # 1 = no shuffle
    shuffle_seed: int = 0
    remove_class_token: bool = True
    merge: str = "joint"                   # several references: ip_adapter.encode.COMBINE
    start_percent: float = 0.0
    end_percent: float = 1.0
    blocks: str = "all blocks"             # a preset of host.block_weights.PRESETS
    block_weights: object = ""             # the custom spec when blocks is custom
    crop: bool = True                      # center crop before CLIP (as the reference processor)

    def injection(self) -> IPAdapterSettings:
        return IPAdapterSettings(weight=self.style_scale, start_percent=self.start_percent,
                                 end_percent=self.end_percent, blocks=self.blocks, block_weights=self.block_weights,
                                 combine=self.merge)


def style_tokens(adapter: IPAdapter, clip_vision, images: torch.Tensor, settings: StyleAdapterSettings) -> ImageTokens:
    """The style tokens of N references: shuffled, encoded, without class token, merged (settings)."""
    if settings.remove_class_token:
        check_has_class_token(adapter.clip_input)  # before CLIP runs, not after
    if settings.shuffle_grid > 1:
        images = shuffle_patches(images, settings.shuffle_grid, settings.shuffle_seed)
    embeds = encode_images(clip_vision, images, adapter.clip_input, crop=settings.crop)
    if settings.remove_class_token:
        embeds = remove_class_token(embeds)
    return image_tokens(adapter, embeds, settings.merge)


def apply_style_adapter(model_patcher, adapter: IPAdapter, clip_vision, images: torch.Tensor,
                        settings: StyleAdapterSettings):
    """A clone of model_patcher whose chosen cross-attention layers run the two-path cross-attention
    F = Attn(Q, K_txt, V_txt) + λ·w_block·Attn(Q, K_s, V_s) with the references' style tokens."""
    return apply_ip_adapter(model_patcher, adapter, style_tokens(adapter, clip_vision, images, settings),
                            settings.injection())
