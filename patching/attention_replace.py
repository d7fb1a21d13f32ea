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

import functools
from typing import Callable, Literal

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import optimized_attention

Kind = Literal["attn1", "attn2"]
Layer = tuple[str, int, int]


class ReplacePatch:
    """Base of StyleKit's attention replace patches; `previous` is the replace it wraps, if any."""

    # Where install_replace put the patch, and the block-wide replace at that layer then (see
    # compose_others); `extras` are callbacks another pack appended with add().
    kind: str | None = None
    layer: tuple | None = None
    block_replace_seen: Callable | None = None
    extras: tuple = ()

    def __init__(self, previous: Callable | None = None):
        self.previous = previous

    def __init_subclass__(cls, **kwargs):
        # Every subclass's __call__ ends with compose_others: what other packs attached to this
        # layer after us runs whatever the subclass computes.
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is None or getattr(call, "_composes_others", False):
            return

        @functools.wraps(call)
        def __call__(self, q, k, v, extra_options):
            return self.compose_others(call(self, q, k, v, extra_options), q, k, v, extra_options)

        __call__._composes_others = True
        cls.__call__ = __call__

    # -- composition with other packs (another IP-Adapter pack's protocol) ---------------------
    def add(self, callback: Callable, **kwargs) -> None:
        """Append a callback as the incumbent IP-Adapter pack (cubiq/ComfyUI_IPAdapter_plus) does on
        the replace it finds at its key: at every call within [sigma_end, sigma_start] of kwargs,
        out += callback(out, q, k, v, extra_options, **kwargs)."""
        self.extras = self.extras + ((callback, kwargs),)

    def set_new_condition(self, *args, **kwargs):
        raise RuntimeError("another node pack tried to append its IP-Adapter to a StyleKit patch through the old "
                           "set_new_condition protocol, which StyleKit cannot take part in; apply that pack's node "
                           "before the StyleKit node (StyleKit wraps what it finds), or update that pack")

    def compose_others(self, out: torch.Tensor, q, k, v, extra_options: dict) -> torch.Tensor:
        """`out` plus what other packs attached to this layer: callbacks appended with add(), and a
        block-wide replace ((block, number), as packs register on SD1.5) registered after ours,
        which core never calls because it prefers our per-layer key."""
        replaces = extra_options.get(REPLACES_OPTION, {}).get(self.kind, {})
        if self.layer is not None and replaces.get(self.layer) is self:  # the patch core called
            late = replaces.get(self.layer[:2])
            if late is not None and late is not self.block_replace_seen:
                plain = optimized_attention(q, k, v, extra_options["n_heads"])
                out = out + (late(q, k, v, extra_options) - plain).to(out.dtype)
        if self.extras:
            sigmas = extra_options.get("sigmas")
            sigma = float(sigmas.detach().flatten()[0]) if sigmas is not None else 999999999.9
            for callback, kwargs in self.extras:
                if kwargs.get("sigma_end", -float("inf")) <= sigma <= kwargs.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kwargs).to(out.dtype)
        return out

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


# Core hands replace patches their transformer_options without "patches_replace"; a diffusion-model
# wrapper publishes it under this key, so a patch can see what was registered after it.
REPLACES_OPTION = "stylekit_patches_replace"
_EXPOSE_KEY = "stylekit_expose_patches_replace"


def _expose_replaces(executor, *args, **kwargs):
    def exposed(options: dict) -> dict:
        return {**options, REPLACES_OPTION: options.get("patches_replace", {})}

    if isinstance(kwargs.get("transformer_options"), dict):
        kwargs = {**kwargs, "transformer_options": exposed(kwargs["transformer_options"])}
    elif len(args) > 5 and isinstance(args[5], dict):  # the UNet: (x, timesteps, context, y, control, options)
        args = (*args[:5], exposed(args[5]), *args[6:])
    return executor(*args, **kwargs)


def install_replace(model_patcher, kind: Kind, layer: Layer,
                    make_patch: Callable[[Callable | None], ReplacePatch]) -> ReplacePatch:
    """Put make_patch(previous) at `layer` of `model_patcher` (which must be a clone)."""
    patch = make_patch(installed_replace(model_patcher, kind, layer))
    patch.kind, patch.layer = kind, tuple(layer)
    replaces = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get(kind, {})
    patch.block_replace_seen = replaces.get(tuple(layer[:2]))
    model_patcher.set_model_patch_replace(patch, kind, layer[0], layer[1], layer[2])
    wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    if not model_patcher.get_wrappers(wrappers, _EXPOSE_KEY):
        model_patcher.add_wrapper_with_key(wrappers, _EXPOSE_KEY, _expose_replaces)
    return patch
