"""XLabs Flux IP-Adapter on a ModelPatcher clone: one double-block replace per weighted double block.

Each patch recomputes the block's pre-RoPE image query (dit_adapters.flux_query) from the block's
inputs, runs whatever was installed at that block before it (another adapter's replace, another
pack's, or core's block), then adds Σ w·m ⊙ Attn(Q_img, K', V') to the image stream, as diffusers'
FluxIPAdapterAttnProcessor does after the MLP residual (DESIGN §6). So adapters stack, and another
pack's block replace keeps running underneath ours.

Controls as the UNet adapters: a global weight times a per-double-block weight (block grammar
names such as "double 0-18", or diffusers' list of one scale per double block), a sigma window,
a mask per adapter resized to the token grid (latent / 2, as core patchifies), and cond/uncond
image tokens (the negative image's tokens go to the uncond rows). Single blocks carry no XLabs
weights: they are never patched.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from comfy.ldm.modules.attention import optimized_attention

from ..attention.dit_image_prompt import flux_ip_attention_split
from ..dit_adapters.flux_query import image_stream_query
from ..dit_adapters.xlabs_flux import BlockKV, XLabsFluxAdapter
from ..ip_adapter.encode import CombineError
from ..host.batch import chunks
from ..host.block_map import FLUX_DOUBLE, BlockMap, block_map
from ..host.block_weights import ALL, CUSTOM, WEIGHT_RANGE, BlockWeightsError, parse_spec, resolve_block_weights
from ..host.schedule import SigmaWindow, current_sigma, percent_window
from .dit_masks import DiTTokenMask, record_token_grid
from .ip_adapter import AdapterMismatch

@dataclass(frozen=True)
class FluxImageTokens:
    """Projected image tokens of one adapter application: cond, uncond [1, T, context]."""
    cond: torch.Tensor
    uncond: torch.Tensor

    def __deepcopy__(self, memo):
        return self


def flux_image_tokens(adapter: XLabsFluxAdapter, embeds: torch.Tensor, negative: torch.Tensor | None = None) -> FluxImageTokens:
    """Project CLIP ViT-L image embeds [N, clip_width] (several references: their tokens side by side).
    The uncond tokens are the negative embeds' (diffusers' pipeline: a black image's), zeros if None."""
    if embeds.ndim != 2 or embeds.shape[1] != adapter.clip_width:
        raise AdapterMismatch(f"{adapter.name} reads {adapter.clip_width}-d CLIP ViT-L/14 image embeds but got "
                              f"features of shape {tuple(embeds.shape)}; load the CLIP ViT-L/14 vision model")
    if negative is None:
        negative = torch.zeros_like(embeds[:1])
    if negative.shape[0] not in (1, embeds.shape[0]) or negative.shape[1:] != embeds.shape[1:]:
        raise AdapterMismatch(f"{negative.shape[0]} negative embeddings for {embeds.shape[0]} references; "
                              "give one, or one per reference")
    negative = negative.expand_as(embeds)
    with torch.no_grad():
        proj = adapter.projection
        cond = proj(embeds.float()).reshape(1, -1, adapter.context_dim)
        uncond = proj(negative.float()).reshape(1, -1, adapter.context_dim)
    return FluxImageTokens(cond, uncond)


def double_block_weights(bm: BlockMap, blocks: str, block_weights: object) -> dict[int, float]:
    """One weight per double block: "all blocks", or the custom spec (block grammar dict / list, or
    diffusers' list with one scale per double block)."""
    doubles = [s for s in bm if s.kind == FLUX_DOUBLE]
    if blocks == ALL:
        return {s.block[1]: 1.0 for s in doubles}
    if blocks != CUSTOM:
        raise BlockWeightsError(f"preset '{blocks}' names UNet blocks; on Flux choose '{ALL}' or '{CUSTOM}' "
                                "(no published source names Flux style blocks for this adapter)")
    spec = parse_spec(block_weights) if isinstance(block_weights, str) else block_weights
    if spec is None:
        raise BlockWeightsError(f"preset '{CUSTOM}' needs a spec, e.g. \"double 0-18\" or {{\"double 5\": 1.0}}")
    if isinstance(spec, (list, tuple)):   # diffusers: one scale per double block
        if len(spec) != len(doubles):
            raise BlockWeightsError(f"a list of scales needs one per double block ({len(doubles)}), got {len(spec)}")
        low, high = WEIGHT_RANGE
        out = {}
        for site, value in zip(doubles, spec):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise BlockWeightsError(f"scale {value!r} for double {site.block[1]}: use a number from {low} to {high}")
            out[site.block[1]] = float(value)
        return out
    per_layer = resolve_block_weights(bm, spec)
    return {s.block[1]: per_layer[s.layers()[0]] for s in doubles}


def check_flux_adapter_fits(adapter: XLabsFluxAdapter, bm: BlockMap) -> None:
    doubles = [s for s in bm if s.kind == FLUX_DOUBLE]
    if not doubles:
        what = "an SD3/SD3.5 model" if bm.is_dit else "a UNet (SD1.x/SDXL) model"
        raise AdapterMismatch(f"{adapter.name} is an XLabs Flux IP-Adapter but the model is {what}; "
                              "load an adapter made for this model")
    if sorted(adapter.kv) != [s.block[1] for s in doubles]:
        raise AdapterMismatch(f"{adapter.name} has K/V weights for {len(adapter.kv)} double blocks but the model has "
                              f"{len(doubles)}; load an adapter made for this Flux model")
    if adapter.hidden != doubles[0].channels:
        raise AdapterMismatch(f"{adapter.name} writes {adapter.hidden}-wide image tokens but the model's double blocks "
                              f"are {doubles[0].channels} wide; load an adapter made for this Flux model")


class FluxKVCache:
    """K', V' of one adapter at one double block for the cond and uncond tokens, per device, dtype and
    head count, heads apart ([1, H, T, D], the layout the block's attention takes)."""

    def __init__(self, kv: BlockKV, tokens: FluxImageTokens):
        self.kv, self.tokens = kv, tokens
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def __deepcopy__(self, memo):
        return self

    def get(self, device, dtype, heads: int) -> tuple[torch.Tensor, ...]:
        key = (str(device), dtype, heads)
        if key not in self._cache:
            out = []
            with torch.no_grad():
                for tokens in (self.tokens.cond, self.tokens.uncond):
                    for t in self.kv(tokens.to(torch.float32)):
                        out.append(t.unflatten(-1, (heads, -1)).transpose(1, 2).contiguous().to(device, dtype))
            self._cache[key] = tuple(out)
        return self._cache[key]


class FluxIPBlockPatch:
    """("double_block", i) replace: the wrapped block, plus this adapter's image attention."""

    def __init__(self, previous: Callable | None, block: torch.nn.Module, kv: FluxKVCache, weight: float,
                 window: SigmaWindow, mask: DiTTokenMask | None):
        self.previous, self.block, self.kv, self.weight, self.window, self.mask = previous, block, kv, weight, window, mask

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        if not self.window.contains(current_sigma(options)):
            return self._run(args, extra)
        q = image_stream_query(self.block, args["img"], args["vec"])  # before the block adds to img in place
        out = self._run(args, extra)
        img = out["img"]
        batch, heads, n_img = q.shape[0], q.shape[1], q.shape[2]
        k_cond, v_cond, k_uncond, v_uncond = self.kv.get(q.device, q.dtype, heads)
        parts = chunks(options, batch)
        rows = parts[0].rows.stop - parts[0].rows.start
        k_ip = torch.cat([(k_uncond if c.is_uncond else k_cond).expand(rows, -1, -1, -1) for c in parts])
        v_ip = torch.cat([(v_uncond if c.is_uncond else v_cond).expand(rows, -1, -1, -1) for c in parts])
        mask = None if self.mask is None else self.mask.for_batch(options, n_img, len(parts), rows, q.device, q.dtype)
        kernel = partial(optimized_attention, heads=heads, skip_reshape=True, transformer_options=options)
        term = flux_ip_attention_split(q, k_ip, v_ip, self.weight, kernel, mask)
        if term is not None:
            out = dict(out)
            out["img"] = img + term.to(img.dtype)
        return out

    def _run(self, args: dict, extra: dict) -> dict:
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)

    def __deepcopy__(self, memo):
        return self

    # ModelPatcher moves/loads the patches it finds in model_options; forward to the wrapped one.
    def to(self, device) -> "FluxIPBlockPatch":
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        return self

    def models(self) -> list:
        return self.previous.models() if hasattr(self.previous, "models") else []


@dataclass(frozen=True)
class FluxIPSettings:
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    blocks: str = ALL
    block_weights: object = ""
    attn_mask: torch.Tensor | None = None   # [M, H, W] in [0, 1]
    node: str = "StyleKit IP-Adapter"


def apply_flux_ip_adapter(model_patcher, adapter: XLabsFluxAdapter, tokens: FluxImageTokens, settings: FluxIPSettings):
    """A clone of model_patcher with the XLabs adapter on its double blocks; the input is not touched."""
    bm = block_map(model_patcher)
    check_flux_adapter_fits(adapter, bm)
    weights = double_block_weights(bm, settings.blocks, settings.block_weights)
    window = percent_window(model_patcher, settings.start_percent, settings.end_percent)
    mask = DiTTokenMask(settings.attn_mask, settings.node) if settings.attn_mask is not None else None
    m = model_patcher.clone()
    replaces = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for index, w in weights.items():
        w = settings.weight * w
        if w == 0:
            continue   # no patch: exactly the plain block
        block = m.get_model_object(f"diffusion_model.double_blocks.{index}")
        patch = FluxIPBlockPatch(replaces.get(("double_block", index)), block,
                                 FluxKVCache(adapter.kv[index], tokens), w, window, mask)
        m.set_model_patch_replace(patch, "dit", "double_block", index)
    if mask is not None:
        record_token_grid(m, at_apply_model=False)
    return m


def refuse_unet_adapter_on_dit(adapter, model_patcher) -> None:
    """AdapterMismatch when a UNet IP-Adapter (SD1.5 / SDXL) meets a Flux or SD3 model."""
    bm = block_map(model_patcher)
    if bm.is_dit:
        model = "Flux" if any(s.kind == FLUX_DOUBLE for s in bm) else "SD3/SD3.5"
        family = getattr(adapter, "family", "a UNet model")
        raise AdapterMismatch(f"{adapter.name} is an IP-Adapter for {family} but the model is {model}; "
                              f"load an adapter made for {model} (Flux: XLabs flux-ip-adapter.safetensors)")


def apply_flux_ip_adapter_embeds(model_patcher, adapter: XLabsFluxAdapter, embeds, settings) -> object:
    """apply_flux_ip_adapter from the IP-Adapter nodes' inputs: ImageEmbeds (CLIP ViT-L image embeds,
    cond and uncond [N, 768]) and IPAdapterSettings (combine: concat = each reference's tokens side by
    side, average = one reference from the mean embedding)."""
    if embeds.source != adapter.clip_input:
        raise AdapterMismatch(f"{adapter.name} reads CLIP {adapter.clip_input} but the embeds hold {embeds.source}; "
                              "encode the references for this adapter")
    cond, uncond = embeds.cond, embeds.uncond
    if settings.combine == "average":
        cond, uncond = cond.mean(0, keepdim=True), uncond.mean(0, keepdim=True)
    elif settings.combine != "concat":
        raise CombineError(f"'{settings.combine}' is for adapters that read patch tokens; the XLabs Flux adapter reads "
                         "one embedding per image: choose concat or average")
    tokens = flux_image_tokens(adapter, cond, uncond)
    flux_settings = FluxIPSettings(weight=settings.weight, start_percent=settings.start_percent,
                                   end_percent=settings.end_percent, blocks=settings.blocks,
                                   block_weights=settings.block_weights, attn_mask=settings.attn_mask,
                                   node=settings.node)
    return apply_flux_ip_adapter(model_patcher, adapter, tokens, flux_settings)
