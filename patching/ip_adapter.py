"""IP-Adapter on a ModelPatcher clone: one attn2 replace per chosen cross-attention layer.

Each patch adds w · m ⊙ Attn(Q, K', V') to whatever attention its layer computed before (core's,
another adapter's, another pack's: patching.attention_replace), so adapters stack, and they run
in any batch layout: the image K/V of every cond/uncond chunk come from `cond_or_uncond`.

Work is skipped where it cannot matter: a layer whose weight is 0 gets no patch at all, and a
patch outside its sigma window returns the plain attention. The image keys/values are computed
once per device and dtype (ImageKV cache) rather than at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from comfy.ldm.modules.attention import optimized_attention

from ..attention.decoupled import ImageKV, add_image_attention
from ..attention.masks import mask_to_tokens, token_grid
from ..ip_adapter.encode import ImageEmbeds, ImageTokens, image_tokens
from ..ip_adapter.model import IPAdapter
from .attention_replace import ReplacePatch, install_replace
from ..host.batch import chunks
from ..host.block_map import BlockMap, LayerId, block_map
from ..host.block_weights import block_weights_for
from ..host.schedule import SigmaWindow, current_sigma, percent_window


class AdapterMismatch(ValueError):
    """The adapter was made for another model; the message says which."""


@dataclass(frozen=True)
class IPAdapterSettings:
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    blocks: str = "all blocks"            # a preset of host.block_weights.PRESETS
    block_weights: object = ""            # the custom spec (text or dict) when blocks is custom
    combine: str = "concat"               # several references: "concat" tokens or "average" features
    attn_mask: torch.Tensor | None = None  # [M, H, W] in [0, 1]; M = 1 or one per latent image
    node: str = "StyleKit IP-Adapter"     # names the node in errors the mask raises during sampling


class ImageKVCache:
    """The image keys/values of one adapter application at one layer, K' = c·W'k, V' = c·W'v for the
    cond and uncond tokens, computed once per (device, dtype) in fp32 and cast. Shared by every
    clone that holds the patch (deepcopy returns it)."""

    def __init__(self, to_k: torch.Tensor, to_v: torch.Tensor, tokens: ImageTokens):
        self.to_k, self.to_v, self.tokens = to_k, to_v, tokens
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def __deepcopy__(self, memo):
        return self

    # Core does not count these caches in its memory planning: above this size (many references,
    # 70 SDXL layers) they are stored in host RAM and brought to the device at each call.
    DEVICE_CACHE_BYTES = 4 << 20

    def get(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(k_cond, v_cond, k_uncond, v_uncond), each [1, T, C]."""
        key = (str(device), dtype)
        if key not in self._cache:
            to_k, to_v = self.to_k.to(device, torch.float32), self.to_v.to(device, torch.float32)
            out = []
            for tokens in (self.tokens.cond, self.tokens.uncond):
                c = tokens.to(device, torch.float32)
                out += [(c @ to_k.T).to(dtype), (c @ to_v.T).to(dtype)]
            if sum(t.numel() * t.element_size() for t in out) > self.DEVICE_CACHE_BYTES:
                out = [t.cpu() for t in out]
            self._cache[key] = tuple(out)
        return tuple(t.to(device, non_blocking=True) for t in self._cache[key])


class TokenMask:
    """A [M, H, W] mask and its resized copies per token grid, device and dtype (shared like ImageKVCache).

    Sizes may differ from the latent's (an image-sized mask is the usual case) but proportions may
    not: a mask of other proportions would be squeezed onto the image, so it is refused."""

    MAX_ASPECT_DRIFT = 1.25   # a few pixels of rounding on small masks, never a different shape

    def __init__(self, mask: torch.Tensor, node: str = "StyleKit IP-Adapter"):
        self.mask, self.node = mask, node
        self._cache: dict[tuple, torch.Tensor] = {}

    def error(self, problem: str) -> ValueError:
        return ValueError(f"{self.node}: input 'attn_mask': {problem}")

    def check_fits(self, latent_hw: tuple[int, int], rows: int) -> None:
        frames, h, w = self.mask.shape
        if frames not in (1, rows):
            raise self.error(f"the mask has {frames} frames for a batch of {rows} latents; give one mask, "
                             "or one per latent")
        if min(h, w) > 1:
            drift = (w / h) / (latent_hw[1] / latent_hw[0])
            if max(drift, 1 / drift) > self.MAX_ASPECT_DRIFT:
                raise self.error(f"the mask is {w}x{h} px but the latent is {latent_hw[1]}x{latent_hw[0]}: its aspect "
                                 "ratio differs from the image's; give a mask of the image's proportions")

    def __deepcopy__(self, memo):
        return self

    def for_layer(self, n_tokens: int, extra_options: dict, device, dtype) -> torch.Tensor:
        shape = extra_options.get("activations_shape") or extra_options["original_shape"]
        key = (n_tokens, tuple(shape[-2:]), str(device), dtype)
        if key not in self._cache:
            grid = token_grid(n_tokens, tuple(shape[-2:]))
            self._cache[key] = mask_to_tokens(self.mask, grid).to(device, dtype)  # [M, N, 1]
        return self._cache[key]


class IPAdapterPatch(ReplacePatch):
    """attn2 replace: the wrapped attention plus this adapter's weighted image attention."""

    def __init__(self, previous, kv: ImageKVCache, weight: float, window: SigmaWindow, mask: TokenMask | None):
        super().__init__(previous)
        self.kv, self.weight, self.window, self.mask = kv, weight, window, mask

    def __call__(self, q, k, v, extra_options):
        out = self.attention(q, k, v, extra_options)
        if not self.window.contains(current_sigma(extra_options)):
            return out
        k_cond, v_cond, k_uncond, v_uncond = self.kv.get(q.device, q.dtype)
        parts = chunks(extra_options, q.shape[0])
        if len(parts) == 1:  # one chunk: broadcast, no copy
            k_ip, v_ip = (k_uncond, v_uncond) if parts[0].is_uncond else (k_cond, v_cond)
        else:
            rows = parts[0].rows.stop - parts[0].rows.start
            k_ip = torch.cat([(k_uncond if c.is_uncond else k_cond).expand(rows, -1, -1) for c in parts])
            v_ip = torch.cat([(v_uncond if c.is_uncond else v_cond).expand(rows, -1, -1) for c in parts])
        mask = None
        if self.mask is not None:
            mask = self._batch_mask(extra_options, q, len(parts))
        # The user's attention backend as core's own attention calls it: the layer's precision
        # (SD2.x upcasts) and transformer_options, where attention-override packs hook in.
        kernel = partial(optimized_attention, heads=extra_options["n_heads"],
                         attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        return add_image_attention(out, q, [ImageKV(k_ip, v_ip, self.weight, mask)], kernel)

    def _batch_mask(self, extra_options: dict, q: torch.Tensor, n_chunks: int) -> torch.Tensor:
        rows = q.shape[0] // n_chunks
        shape = extra_options.get("original_shape") or extra_options["activations_shape"]
        self.mask.check_fits(tuple(shape[-2:]), rows)
        mask = self.mask.for_layer(q.shape[1], extra_options, q.device, q.dtype)  # [M, N, 1]
        return mask if mask.shape[0] == 1 else mask.repeat(n_chunks, 1, 1)


def check_adapter_fits(adapter: IPAdapter, bm: BlockMap) -> None:
    """Raise AdapterMismatch unless the adapter has K/V weights of the right shape for every layer."""
    context = {s.context_dim for s in bm}
    if context != {adapter.context_dim}:
        family = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(next(iter(context)), "this")
        raise AdapterMismatch(f"{adapter.name} is an IP-Adapter for {adapter.family} (its K/V read "
                              f"{adapter.context_dim}-d text context) but the model is {family} "
                              f"({'/'.join(map(str, sorted(context)))}-d); load an adapter made for this model")
    keys = sorted(k for s in bm for k in s.ip_adapter_keys)
    if sorted(adapter.kv) != keys:
        raise AdapterMismatch(f"{adapter.name} has K/V weights for {len(adapter.kv)} cross-attention layers but the "
                              f"model has {len(keys)}; load an adapter made for this model")
    for site in bm:
        for key in site.ip_adapter_keys:
            if adapter.kv[key][0].shape[0] != site.channels:
                raise AdapterMismatch(f"{adapter.name}: ip_adapter.{key} gives {adapter.kv[key][0].shape[0]} channels "
                                      f"but {site.diffusers_name} has {site.channels}")


def layer_weights(bm: BlockMap, settings: IPAdapterSettings) -> dict[LayerId, float]:
    """Final weight per layer: the global weight times the resolved block weight."""
    return {layer: settings.weight * w for layer, w in block_weights_for(bm, settings.blocks, settings.block_weights).items()}


def apply_ip_adapter(model_patcher, adapter: IPAdapter, tokens: ImageTokens, settings: IPAdapterSettings):
    """A clone of model_patcher with the adapter injected; the input model is not touched."""
    bm = block_map(model_patcher)
    check_adapter_fits(adapter, bm)
    weights = layer_weights(bm, settings)
    window = percent_window(model_patcher, settings.start_percent, settings.end_percent)
    mask = TokenMask(settings.attn_mask, settings.node) if settings.attn_mask is not None else None
    m = model_patcher.clone()
    for site in bm:
        for layer, key in zip(site.layers(), site.ip_adapter_keys):
            w = weights[layer]
            if w == 0:
                continue  # no patch: exactly the plain attention, at no cost
            kv = ImageKVCache(*adapter.kv[key], tokens)
            install_replace(m, "attn2", layer,
                            lambda previous, kv=kv, w=w: IPAdapterPatch(previous, kv, w, window, mask))
    return m


def apply_ip_adapter_embeds(model_patcher, adapter: IPAdapter, embeds: ImageEmbeds, settings: IPAdapterSettings):
    """Project encoded reference images (settings.combine) and inject them: apply_ip_adapter's
    entry point for CLIP vision features."""
    return apply_ip_adapter(model_patcher, adapter, image_tokens(adapter, embeds, settings.combine), settings)
