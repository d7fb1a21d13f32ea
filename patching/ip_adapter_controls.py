"""The incumbent IP-Adapter pack's controls on our IP-Adapter engine (patching/ip_adapter.py):
weight types (ip_adapter/weight_types.py), embeds scaling (attention/embeds_scaling.py), and
per-frame weights with batch unfold (reference i drives latent i, for animation workflows).

Same patch mechanics as apply_ip_adapter: a clone, one attn2 replace per layer whose weight is not
0, wrapping whatever was there. The per-layer weight is the weight type's times the block preset's
(so a curve composes with an InstantStyle preset).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from comfy.ldm.modules.attention import optimized_attention

from ..attention.decoupled import ImageKV, add_image_attention
from ..attention.embeds_scaling import EMBEDS_SCALING, scale_image_kv
from ..host.batch import chunks
from ..host.block_map import block_map
from ..host.block_weights import block_weights_for
from ..host.schedule import current_sigma, percent_window
from ..ip_adapter.encode import ImageEmbeds, ImageTokens, image_tokens
from ..ip_adapter.model import IPAdapter
from ..ip_adapter.weight_types import WEIGHT_TYPES, weight_type_plan
from .attention_replace import install_replace
from .ip_adapter import ImageKVCache, IPAdapterPatch, IPAdapterSettings, TokenMask, check_adapter_fits

MAX_FRAMES = 4096


@dataclass(frozen=True)
class IPAdapterControls:
    weight_type: str = "linear"
    weight_composition: float | None = None     # "style and composition": the composition layers' weight
    embeds_scaling: str = "V only"
    frame_weights: tuple[float, ...] | None = None  # one weight per latent (replaces the global weight)
    unfold_batch: bool = False                  # reference i for latent i (the last one repeats)
    incumbent_middle: bool = False              # leave the middle block out, as the incumbent does
    stretch_mask: bool = False                  # fit the mask to any latent shape (tile masks)


def fit_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [N, ...] to `rows` rows: truncated, or its last row repeated (the incumbent's rule)."""
    if x.shape[0] >= rows:
        return x[:rows]
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


class StretchedTokenMask(TokenMask):
    """A tile's mask: laid over the whole latent whatever its proportions, as the incumbent lays its
    tile masks (a reference of other proportions than the image is squeezed, not refused)."""

    def check_fits(self, latent_hw: tuple[int, int], rows: int) -> None:
        frames = self.mask.shape[0]
        if frames not in (1, rows):
            raise self.error(f"the mask has {frames} frames for a batch of {rows} latents; give one mask, "
                             "or one per latent")


class ControlledIPAdapterPatch(IPAdapterPatch):
    """IPAdapterPatch with per-row weights and references, embeds scaling and the precise swap."""

    def __init__(self, previous, kv: ImageKVCache, weight, window, mask: TokenMask | None,
                 scaling: str, swapped: bool):
        super().__init__(previous, kv, weight, window, mask)
        self.scaling, self.swapped = scaling, swapped

    def __call__(self, q, k, v, extra_options):
        out = self.attention(q, k, v, extra_options)
        if not self.window.contains(current_sigma(extra_options)):
            return out
        k_cond, v_cond, k_uncond, v_uncond = self.kv.get(q.device, q.dtype)
        if self.swapped:  # "precise": the image moves to the uncond rows, the cond rows get none
            k_cond, v_cond, k_uncond, v_uncond = k_cond * 0, v_cond * 0, k_cond, v_cond
        parts = chunks(extra_options, q.shape[0])
        rows = parts[0].rows.stop - parts[0].rows.start
        k_ip = torch.cat([fit_rows(k_uncond if c.is_uncond else k_cond, rows) for c in parts])
        v_ip = torch.cat([fit_rows(v_uncond if c.is_uncond else v_cond, rows) for c in parts])
        weight = self.weight
        if isinstance(weight, tuple):
            per_row = fit_rows(torch.tensor(weight, dtype=q.dtype, device=q.device), rows)
            weight = per_row.repeat(len(parts))[:, None, None]
        k_ip, v_ip, w_out = scale_image_kv(k_ip, v_ip, weight, self.scaling)
        if isinstance(w_out, torch.Tensor):  # V only with per-row weights: w·Attn(Q,K,V) = Attn(Q,K,w·V)
            v_ip, w_out = v_ip * w_out, 1.0
        mask = self._batch_mask(extra_options, q, len(parts)) if self.mask is not None else None
        kernel = partial(optimized_attention, heads=extra_options["n_heads"],
                         attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        return add_image_attention(out, q, [ImageKV(k_ip, v_ip, w_out, mask)], kernel)


def unfolded_tokens(adapter: IPAdapter, embeds: ImageEmbeds) -> ImageTokens:
    """One token set per reference, [N, T, C]: reference i for latent i."""
    per_image = [image_tokens(adapter, ImageEmbeds(embeds.cond[i:i + 1], embeds.uncond[i:i + 1], embeds.source,
                                                   embeds.class_token)) for i in range(embeds.count)]
    return ImageTokens(cond=torch.cat([t.cond for t in per_image]), uncond=torch.cat([t.uncond for t in per_image]))


def controlled_layer_weights(bm, settings: IPAdapterSettings, controls: IPAdapterControls):
    """{layer: weight or per-frame tuple}, and the swapped layers."""
    if controls.weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {controls.weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    if controls.embeds_scaling not in EMBEDS_SCALING:
        raise ValueError(f"unknown embeds scaling {controls.embeds_scaling!r}; choose one of {', '.join(EMBEDS_SCALING)}")
    blocks = block_weights_for(bm, settings.blocks, settings.block_weights)
    frames = controls.frame_weights or (settings.weight,)
    plans = [weight_type_plan(bm, controls.weight_type, w, controls.weight_composition,
                              incumbent_middle=controls.incumbent_middle) for w in frames]
    weights = {}
    for layer, b in blocks.items():
        values = tuple(p.weights[layer] * b for p in plans)
        weights[layer] = values if controls.frame_weights else values[0]
    return weights, plans[0].swapped


def apply_ip_adapter_controlled(model_patcher, adapter: IPAdapter, embeds: ImageEmbeds, settings: IPAdapterSettings,
                                controls: IPAdapterControls):
    """A clone of model_patcher with the adapter injected under the incumbent's controls."""
    bm = block_map(model_patcher)
    check_adapter_fits(adapter, bm)
    if controls.frame_weights is not None and not 1 <= len(controls.frame_weights) <= MAX_FRAMES:
        raise ValueError(f"give 1 to {MAX_FRAMES} frame weights, not {len(controls.frame_weights)}")
    weights, swapped = controlled_layer_weights(bm, settings, controls)
    tokens = unfolded_tokens(adapter, embeds) if controls.unfold_batch else image_tokens(adapter, embeds, settings.combine)
    window = percent_window(model_patcher, settings.start_percent, settings.end_percent)
    mask_kind = StretchedTokenMask if controls.stretch_mask else TokenMask
    mask = mask_kind(settings.attn_mask, settings.node) if settings.attn_mask is not None else None
    m = model_patcher.clone()
    for site in bm:
        for layer, key in zip(site.layers(), site.ip_adapter_keys):
            w = weights[layer]
            if (all(x == 0 for x in w) if isinstance(w, tuple) else w == 0):
                continue
            kv = ImageKVCache(*adapter.kv[key], tokens)
            install_replace(m, "attn2", layer,
                            lambda previous, kv=kv, w=w, s=layer in swapped: ControlledIPAdapterPatch(
                                previous, kv, w, window, mask, controls.embeds_scaling, s))
    return m


def apply_ip_adapter_tiled(model_patcher, adapter: IPAdapter, clip_vision, image: torch.Tensor,
                           settings: IPAdapterSettings, controls: IPAdapterControls, sharpening: float = 0.0,
                           negative_image: torch.Tensor | None = None):
    """One image prompt per tile of the reference (ip_adapter/tiling.py), each masked to where its tile
    lies. Returns the patched clone, the tiles (IMAGE, K·N rows) and their masks (MASK [K·M, h, w])."""
    from ..ip_adapter.encode import encode_images
    from ..ip_adapter.tiling import tile_reference

    tiles, masks, _ = tile_reference(image, clip_input_size(clip_vision), sharpening, settings.attn_mask)
    m = model_patcher
    for tile, tile_mask in zip(tiles, masks):
        embeds = encode_images(clip_vision, tile, adapter.clip_input, negative_image, crop=False)
        m = apply_ip_adapter_controlled(m, adapter, embeds, replace(settings, attn_mask=tile_mask),
                                        replace(controls, stretch_mask=True))
    return m, torch.cat(tiles), masks.reshape(-1, *masks.shape[-2:])


def clip_input_size(clip_vision) -> int:
    """The side of the square a core CLIP_VISION model reads (224 for ViT-H and ViT-bigG)."""
    return int(getattr(clip_vision, "image_size", 224))
