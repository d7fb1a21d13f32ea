"""Tiled references against the incumbent's tiling (IPAdapterPlus.py IPAdapterTiled.apply_tiled and
utils.py contrast_adaptive_sharpening, cubiq/ComfyUI_IPAdapter_plus at 9d076a3), written out here,
and the Tiled / Advanced nodes on the SD1.5 fixture."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.ip_adapter.files import load_ip_adapter
from stylekit.ip_adapter.tiling import sharpen, tile_layout, tile_reference
from stylekit.nodes.ip_adapter_controls import StyleKitIPAdapterAdvanced, StyleKitIPAdapterTiled
from stylekit.host.block_weights import ALL
from stylekit.patching.ip_adapter_controls import ControlledIPAdapterPatch
from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H
from stylekit.tests.support.host import load_clip_vision

INJECTION = dict(weight=1.0, start_percent=0.0, end_percent=1.0, blocks=ALL, block_weights="", combine="concat")
CONTROLS = dict(weight_type="linear", weight_composition=1.0, embeds_scaling="V only", skip_middle_block=False)


def incumbent_tiles(oh: int, ow: int, tile_size: int):
    """(size after resize and crop, tile starts) as apply_tiled computes them."""
    if oh / ow > 0.75 and oh / ow < 1.33:
        size = (tile_size * 2, tile_size * 2)
    else:
        size = (tile_size, int(tile_size * ow / oh)) if oh < ow else (int(tile_size * oh / ow), tile_size)
    if oh / ow > 4 or oh / ow < 0.25:
        size = (tile_size, tile_size * 4) if oh < ow else (tile_size * 4, tile_size)
    oh, ow = size
    tiles_x = math.ceil(ow / tile_size)
    tiles_y = math.ceil(oh / tile_size)
    overlap_x = max(0, (tiles_x * tile_size - ow) / (tiles_x - 1 if tiles_x > 1 else 1))
    overlap_y = max(0, (tiles_y * tile_size - oh) / (tiles_y - 1 if tiles_y > 1 else 1))
    starts = [(int(y * (tile_size - overlap_y)), int(x * (tile_size - overlap_x)))
              for y in range(tiles_y) for x in range(tiles_x)]
    return size, starts


@pytest.mark.parametrize("shape", [(512, 512), (600, 500), (224, 700), (900, 300), (100, 1000), (3000, 256)])
def test_tile_geometry_is_the_incumbents(shape):
    size, starts = incumbent_tiles(*shape, 224)
    layout = tile_layout(*shape, 224)
    assert layout.size == size
    assert [(b[0], b[1]) for b in layout.boxes] == starts
    assert all(b[2] - b[0] == 224 and b[3] - b[1] == 224 for b in layout.boxes)


def test_tiles_and_masks_cover_the_resized_reference():
    image = torch.rand(1, 300, 900, 3)
    mask = torch.zeros(1, 300, 900)
    mask[:, :, :450] = 1.0
    tiles, masks, layout = tile_reference(image, 224, mask=mask)
    assert len(tiles) == 3 and all(t.shape == (1, 224, 224, 3) for t in tiles)
    assert masks.shape == (3, 1, 224, 672)
    (y0, x0, y1, x1) = layout.boxes[2]
    assert masks[2, 0, :, :x0].sum() == 0 and masks[2, 0, y0:y1, x1 - 10:x1].sum() == 0  # right tile, masked-out half
    assert masks[0, 0, 10:-10, 10:200].min() > 0.99


def incumbent_sharpening(image, amount):
    """utils.contrast_adaptive_sharpening, as written there."""
    img = torch.nn.functional.pad(image, (1, 1, 1, 1))
    a, b, c = img[..., :-2, :-2], img[..., :-2, 1:-1], img[..., :-2, 2:]
    d, e, f = img[..., 1:-1, :-2], img[..., 1:-1, 1:-1], img[..., 1:-1, 2:]
    g, h, i = img[..., 2:, :-2], img[..., 2:, 1:-1], img[..., 2:, 2:]
    mn = torch.stack((b, d, e, f, h)).min(0)[0].clamp(min=0) + torch.stack((a, c, g, i)).min(0)[0].clamp(min=0)
    mx = torch.stack((b, d, e, f, h)).max(0)[0].clamp(max=1) + torch.stack((a, c, g, i)).max(0)[0].clamp(max=1)
    amp = torch.sqrt(torch.reciprocal(mx) * torch.minimum(mn, (2 - mx)))
    w = - amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    div = torch.reciprocal(1 + 4 * w)
    return torch.nan_to_num(((b + d + f + h) * w + e) * div).clamp(0, 1)


@pytest.mark.parametrize("amount", [0.0, 0.4, 1.0])
def test_sharpening_is_contrast_adaptive_sharpening_as_the_incumbent_computes_it(amount):
    image = torch.rand(2, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sharpen(image, amount), incumbent_sharpening(image, amount))
    assert not torch.equal(sharpen(image, 1.0), image)


def test_the_tiled_node_puts_one_masked_image_prompt_per_tile_on_the_model(sd15):
    adapter = load_ip_adapter("ip-adapter_sd15.safetensors")
    clip_vision = load_clip_vision(CLIP_VISION_VIT_H.filename)
    image = torch.rand(1, 96, 300, 3)
    model, tiles, masks = StyleKitIPAdapterTiled.execute(
        model=sd15.model, ipadapter=adapter, clip_vision=clip_vision, image=image, sharpening=0.3,
        **INJECTION, **CONTROLS).args
    assert tiles.shape == (4, 224, 224, 3) and masks.shape == (4, 224, 700)  # 96 x 300: short side to 224
    patch = model.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    chain = []
    while isinstance(patch, ControlledIPAdapterPatch):
        chain.append(patch)
        patch = patch.previous
    assert len(chain) == 4 and all(p.mask is not None for p in chain)
    assert "patches_replace" not in sd15.model.model_options["transformer_options"]


def test_the_advanced_node_names_a_bad_frame_weight_list(sd15):
    adapter = load_ip_adapter("ip-adapter_sd15.safetensors")
    clip_vision = load_clip_vision(CLIP_VISION_VIT_H.filename)
    with pytest.raises(ValueError, match=r"^StyleKit IP-Adapter Advanced: input 'frame_weights': .*one weight per latent"):
        StyleKitIPAdapterAdvanced.execute(model=sd15.model, ipadapter=adapter, clip_vision=clip_vision,
                                          image=torch.rand(1, 64, 64, 3), unfold_batch=True, frame_weights="1, x",
                                          **INJECTION, **CONTROLS)
