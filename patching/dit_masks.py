"""Per-adapter masks of DiT image prompts, on the DiT's image-token grid (Flux and SD3/SD3.5).

Both DiTs patchify the latent by 2 (core pads an odd side), so a mask [M, H, W] becomes one weight
per image token of the (ceil(h/2), ceil(w/2)) grid, by the box filter of attention.masks. A block
replace sees only the token count, not the grid's sides, so a model wrapper records the grid of
each call into that call's transformer_options: Flux runs DIFFUSION_MODEL wrappers; core's MMDiT
does not (DESIGN §6), so on SD3 the wrapper sits at APPLY_MODEL, whose latent has the same sides.
"""
from __future__ import annotations

import math

import comfy.patcher_extension
import torch

from ..attention.masks import mask_to_tokens

GRID_KEY = "stylekit_dit_token_grid"   # transformer_options entry: (rows, cols) of image tokens
GRID_WRAPPER = "stylekit_dit_token_grid"
PATCH = 2                               # Flux.1 and SD3/SD3.5 patchify 2x2


class DiTTokenMask:
    """A [M, H, W] mask resized to the image-token grid, cached per grid, device and dtype. Shared
    by clones (never mutated after install but for its cache)."""

    def __init__(self, mask: torch.Tensor, node: str):
        self.mask, self.node = mask, node
        self._cache: dict[tuple, torch.Tensor] = {}

    def __deepcopy__(self, memo):
        return self

    def tokens(self, grid: tuple[int, int], n_tokens: int, rows: int, device, dtype) -> torch.Tensor:
        """[M, n_tokens, 1]; tokens past the grid (Flux Kontext's reference latents) get 0."""
        frames = self.mask.shape[0]
        if frames not in (1, rows):
            raise ValueError(f"{self.node}: input 'attn_mask': the mask has {frames} frames for a batch of {rows} "
                             "latents; give one mask, or one per latent")
        key = (grid, n_tokens, str(device), dtype)
        if key not in self._cache:
            m = mask_to_tokens(self.mask, grid)
            if m.shape[1] < n_tokens:
                m = torch.cat([m, m.new_zeros(m.shape[0], n_tokens - m.shape[1], 1)], dim=1)
            self._cache[key] = m.to(device, dtype)
        return self._cache[key]

    def for_batch(self, options: dict, n_tokens: int, chunks: int, rows: int, device, dtype) -> torch.Tensor:
        """The mask for a batch of `chunks` cond/uncond chunks of `rows` latents each: [1 or B, n_tokens, 1]."""
        grid = options.get(GRID_KEY)
        if grid is None:
            raise RuntimeError("a DiT IP-Adapter mask needs the token grid, recorded by its model wrapper; "
                               "run the model through a sampler or apply_model")
        m = self.tokens(grid, n_tokens, rows, device, dtype)
        return m if m.shape[0] == 1 else m.repeat(chunks, 1, 1)


def _record_grid(executor, x, *args, **kwargs):
    """Model wrapper: the image-token grid of this call. x is the latent [B, C, H, W]; transformer_options
    is the last positional argument (DIFFUSION_MODEL and APPLY_MODEL alike) or a keyword."""
    options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options")
    if options is not None:
        options[GRID_KEY] = (math.ceil(x.shape[-2] / PATCH), math.ceil(x.shape[-1] / PATCH))
    return executor(x, *args, **kwargs)


def record_token_grid(model_patcher, at_apply_model: bool) -> None:
    """Add the grid-recording wrapper to a clone once (at APPLY_MODEL for core's MMDiT, else at
    DIFFUSION_MODEL)."""
    kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL if at_apply_model else comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    if GRID_WRAPPER not in model_patcher.wrappers.get(kind, {}):
        model_patcher.add_wrapper_with_key(kind, GRID_WRAPPER, _record_grid)
