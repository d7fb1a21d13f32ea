"""Install attn1/attn2 replace patches on a clone so that they compose (DESIGN §5).

Core keeps one replace per (kind, block, number[, index]); a second setter call silently drops
the first. So every StyleKit replace patch wraps whatever was installed at its layer before it
(ours or another pack's) and calls it as its plain attention path: two IP-Adapters on one block
give text + ip1 + ip2, and StyleAligned over another pack's attn1 replace hands that pack its
modified q/k/v. Patches subclass ReplacePatch, whose `attention()` is that plain path.

Replace patches receive projected q, k, v as [batch, tokens, heads * dim_head] and return the
same layout before to_out.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from comfy.ldm.modules.attention import optimized_attention

Kind = Literal["attn1", "attn2"]
Layer = tuple[str, int, int]


class ReplacePatch:
    """Base of StyleKit's attention replace patches; `previous` is the replace it wraps, if any."""

    def __init__(self, previous: Callable | None = None):
        self.previous = previous

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """The plain attention of this layer: the wrapped replace, or core's optimized_attention
        (which keeps the user's backend: SDPA, xformers, sage...). Core's attention gets the
        layer's attn_precision (SD2.x upcasting) and the transformer options (extra_options holds
        them all), so an `optimized_attention_override` set there still runs on our layers."""
        if self.previous is None:
            return optimized_attention(q, k, v, extra_options["n_heads"], mask=mask,
                                       attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)
        if mask is not None:
            raise NotImplementedError(
                f"{type(self).__name__} needs an attention bias, which the replace patch already "
                f"installed on this layer ({type(self.previous).__name__}) cannot take")
        return self.previous(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        raise NotImplementedError

    # ModelPatcher moves and loads the patches it finds in model_options; the wrapped patch sits
    # inside ours, where it cannot see it, so both calls are forwarded.
    def to(self, device) -> "ReplacePatch":
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        self.to_device(device)
        return self

    def to_device(self, device) -> None:
        """Move this patch's own tensors; override when it holds any."""

    def models(self) -> list:
        return self.previous.models() if hasattr(self.previous, "models") else []


def installed_replace(model_patcher, kind: Kind, layer: Layer) -> Callable | None:
    """The replace core would call at this layer: the per-layer entry, else the block-wide one."""
    replaces = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get(kind, {})
    return replaces.get(layer, replaces.get(layer[:2]))


def install_replace(model_patcher, kind: Kind, layer: Layer,
                    make_patch: Callable[[Callable | None], ReplacePatch]) -> ReplacePatch:
    """Put make_patch(previous) at `layer` of `model_patcher` (which must be a clone)."""
    patch = make_patch(installed_replace(model_patcher, kind, layer))
    model_patcher.set_model_patch_replace(patch, kind, layer[0], layer[1], layer[2])
    return patch
