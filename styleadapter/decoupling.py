"""StyleAdapter's strategies that strip semantics from style references (Wang et al. 2023, §3):

- patch shuffle: cut each reference into a grid of equal cells and permute the cells before
  encoding: colours, strokes and textures stay, the layout (what the picture shows) is broken;
- class-token removal: drop the CLIP class embedding, the token that summarises the picture's
  meaning, and keep the patch tokens (token-sequence adapters only);
- several references of one style: merged when projected (ip_adapter.encode.image_tokens,
  combine "joint" = one token set read from every reference's patch tokens).

Pure torch (no comfy import), on IMAGE batches and CLIP feature tensors; styleadapter/stages.py
applies them to the pack's ImageEmbeds, for every adapter of the pack.
"""
from __future__ import annotations

import torch
from einops import rearrange


def patch_permutations(count: int, cells: int, seed: int) -> list[torch.Tensor]:
    """One permutation of `cells` cells per image, drawn from one generator seeded with `seed`.

    A permutation that leaves every cell in place is drawn again (with more than one cell), so a
    shuffle always moves something; the draws stay a function of the seed alone."""
    generator = torch.Generator().manual_seed(seed)
    identity = torch.arange(cells)
    out = []
    for _ in range(count):
        perm = torch.randperm(cells, generator=generator)
        while cells > 1 and torch.equal(perm, identity):
            perm = torch.randperm(cells, generator=generator)
        out.append(perm)
    return out


def shuffle_patches(images: torch.Tensor, grid: int, seed: int) -> torch.Tensor:
    """Cut each image into grid x grid equal cells and permute them (StyleAdapter's patch shuffle).

    Cells are (H // grid) x (W // grid) pixels; the H % grid bottom rows and W % grid right
    columns that do not fill a cell stay where they are, so the output holds exactly the input's
    pixels (a permutation, nothing resampled or lost). Image i uses the i-th permutation of
    patch_permutations(N, grid², seed). grid 1 returns the images unchanged.
    Shapes: IMAGE [N, H, W, C] -> [N, H, W, C].
    """
    n, height, width, _ = images.shape
    if grid < 1 or grid > min(height, width):
        raise ValueError(f"grid {grid} does not fit a {width}x{height} image; use 1 to {min(height, width)}")
    if grid == 1:
        return images
    ch, cw = height // grid, width // grid
    cells = rearrange(images[:, :ch * grid, :cw * grid], "n (gh h) (gw w) c -> n (gh gw) h w c", gh=grid, gw=grid)
    perms = torch.stack(patch_permutations(n, grid * grid, seed)).to(images.device)
    shuffled = torch.stack([cells[i, perms[i]] for i in range(n)])
    out = images.clone()
    out[:, :ch * grid, :cw * grid] = rearrange(shuffled, "n (gh gw) h w c -> n (gh h) (gw w) c", gh=grid, gw=grid)
    return out


def drop_class_token(features: torch.Tensor) -> torch.Tensor:
    """CLIP vision hidden states without the class token (the first token of each sequence).

    Shapes: [N, S, H] -> [N, S - 1, H], exactly one token dropped per image."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"expected token sequences [N, S >= 2, H], got {tuple(features.shape)}")
    return features[:, 1:]
