"""Tiled references: a large or non-square image prompt split into square tiles of the CLIP input
size, each with a mask of where it lies, so nothing is lost to CLIP's centre crop (the incumbent
IP-Adapter pack's "tiled" apply, same geometry). Pure torch.

Geometry, for a reference H x W and tile side t:
  - nearly square (0.75 < H/W < 1.33): centre-crop to a square, resize to 2t x 2t: four tiles;
  - otherwise resize the short side to t and the long side in proportion, and centre-crop the long
    side to 4t when it is longer (at most four tiles along it);
  - along each side n = ceil(side / t) tiles, spread evenly: tile i starts at
    int(i · (t − overlap)), overlap = (n·t − side) / (n − 1) (0 for one tile).
Each tile's mask is 0 on the resized reference except under the tile, where it is the attention
mask (1 everywhere without one); it steers that tile's image prompt to that part of the picture,
so the generated image should have the reference's proportions (after the crop).
Resizing is bicubic with antialiasing (the incumbent resizes with PIL's Lanczos).

`sharpen` is contrast-adaptive sharpening (AMD FidelityFX CAS), the incumbent's optional step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_SIDE = 8192


@dataclass(frozen=True)
class TileLayout:
    crop: tuple[int, int] | None   # centre crop (h, w) of the original before resizing, if any
    resize: tuple[int, int]        # (h, w) the (cropped) reference is resized to
    crop_after: tuple[int, int] | None  # centre crop (h, w) after resizing (very long references)
    boxes: tuple[tuple[int, int, int, int], ...]  # (y0, x0, y1, x1) of each tile, row by row

    @property
    def size(self) -> tuple[int, int]:
        return self.crop_after or self.resize


def tile_layout(height: int, width: int, tile: int) -> TileLayout:
    ratio = height / width
    crop, crop_after = None, None
    if 0.75 < ratio < 1.33:
        side = min(height, width)
        crop, resize = (side, side), (2 * tile, 2 * tile)
    elif height < width:
        resize = (tile, int(tile * width / height))
    else:
        resize = (int(tile * height / width), tile)
    if ratio > 4 or ratio < 0.25:
        crop_after = (tile, 4 * tile) if height < width else (4 * tile, tile)
    h, w = crop_after or resize
    boxes = []
    n_x, n_y = math.ceil(w / tile), math.ceil(h / tile)
    over_x = max(0.0, (n_x * tile - w) / (n_x - 1 if n_x > 1 else 1))
    over_y = max(0.0, (n_y * tile - h) / (n_y - 1 if n_y > 1 else 1))
    for y in range(n_y):
        for x in range(n_x):
            x0, y0 = int(x * (tile - over_x)), int(y * (tile - over_y))
            boxes.append((y0, x0, min(y0 + tile, h), min(x0 + tile, w)))
    return TileLayout(crop, resize, crop_after, tuple(boxes))


def _centre_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x [..., H, W] cropped to size around its centre."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
    return x[..., top:top + size[0], left:left + size[1]]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def sharpen(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Contrast-adaptive sharpening of images [N, C, H, W] in [0, 1]; amount in [0, 1]."""
    padded = F.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    centre = at(0, 0)
    cross = torch.stack([at(-1, 0), at(0, -1), centre, at(0, 1), at(1, 0)])
    corners = torch.stack([at(-1, -1), at(-1, 1), at(1, -1), at(1, 1)])
    low = cross.min(0).values.clamp(min=0) + corners.min(0).values.clamp(min=0)
    high = cross.max(0).values.clamp(max=1) + corners.max(0).values.clamp(max=1)
    # How much room the neighbourhood leaves before clipping, relative to its brightest value.
    amp = torch.sqrt(torch.minimum(low, 2 - high) / high)
    lobe = -amp * (1 / 8 + amount * (1 / 5 - 1 / 8))
    neighbours = at(-1, 0) + at(0, -1) + at(0, 1) + at(1, 0)
    return torch.nan_to_num((neighbours * lobe + centre) / (1 + 4 * lobe)).clamp(0, 1)


def tile_reference(image: torch.Tensor, tile: int, sharpening: float = 0.0,
                   mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor, TileLayout]:
    """Split IMAGE [N, H, W, 3] into tiles.

    Returns the tiles (each IMAGE [N, tile, tile, 3]), their masks [K, M, h, w] (M = mask frames,
    1 without a mask) on the resized reference, and the layout."""
    n, height, width, _ = image.shape
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"the reference is {width}x{height} px; give at most {MAX_SIDE} px a side")
    layout = tile_layout(height, width, tile)
    pixels = image.movedim(-1, 1).float()
    masks = torch.ones(1, 1, height, width) if mask is None else mask.float().reshape(-1, 1, *mask.shape[-2:])
    masks = _resize(masks, (height, width)) if masks.shape[-2:] != (height, width) else masks
    if layout.crop:
        pixels, masks = _centre_crop(pixels, layout.crop), _centre_crop(masks, layout.crop)
    pixels, masks = _resize(pixels, layout.resize).clamp(0, 1), _resize(masks, layout.resize).clamp(0, 1)
    if layout.crop_after:
        pixels, masks = _centre_crop(pixels, layout.crop_after), _centre_crop(masks, layout.crop_after)
    if sharpening > 0:
        pixels = sharpen(pixels, sharpening)
    tiles, tile_masks = [], []
    for y0, x0, y1, x1 in layout.boxes:
        tiles.append(pixels[:, :, y0:y1, x0:x1].movedim(1, -1).to(image.dtype))
        m = torch.zeros_like(masks)
        m[..., y0:y1, x0:x1] = masks[..., y0:y1, x0:x1]
        tile_masks.append(m[:, 0])
    return tiles, torch.stack(tile_masks), layout
