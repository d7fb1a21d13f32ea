"""StyleAligned's shared GroupNorm, reversibly: object patches on a clone plus a diffusion-model wrapper.

Shared GroupNorm normalises a target row with group statistics computed jointly over the row and
its reference row (the official code concatenates the reference's feature map to the row's
before the norm); a reference row is normalised alone, as usual.

How it stays on the clone. Each GroupNorm of the UNet gets an object patch: a shallow copy of
that very module (same class family, same Parameter objects, same attribute names, so weight
patches, LoRA keys, casting and low-VRAM loading see what they always see) whose class adds the
sharing. ModelPatcher swaps the copies in when it loads this clone and restores the originals
when any other clone loads; nothing global changes. A GroupNorm receives no transformer_options,
so a DIFFUSION_MODEL wrapper on the same clone publishes the running call's transformer_options
(cond_or_uncond, sigmas) to the copies for exactly the duration of the call (try/finally). Called
by anyone else, or outside the sigma window, a copy is the plain GroupNorm.
"""
from __future__ import annotations

import copy

import comfy.patcher_extension
import torch

from ..host.reference_rows import has_targets, reference_rows
from ..host.schedule import SigmaWindow, current_sigma

WRAPPER_KEY = "stylekit_shared_group_norm"


class CallContext:
    """The transformer_options of the diffusion-model call in progress (a stack: calls may nest)."""

    def __init__(self, window: SigmaWindow):
        self.window = window
        self._stack: list[dict] = []

    def reference_rows(self, batch_size: int) -> torch.Tensor | None:
        """Rows to share with in the running call, or None when sharing is off for it."""
        if not self._stack:
            return None
        options = self._stack[-1]
        if not self.window.contains(current_sigma(options)):
            return None
        rows = reference_rows(options, batch_size)
        return rows if has_targets(rows) else None

    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, *args, **kwargs):
        self._stack.append(transformer_options)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, *args, **kwargs)
        finally:
            self._stack.pop()


class _SharedNorm:
    """Mixin put in front of the original norm class; `_stylekit_context` is set per copy."""

    _stylekit_context: CallContext

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = super().forward
        rows = self._stylekit_context.reference_rows(x.shape[0])
        if rows is None:
            return plain(x, *args, **kwargs)
        rows = rows.to(x.device)
        is_reference = rows == torch.arange(x.shape[0], device=x.device)
        out = torch.empty_like(x)
        ref_idx, tgt_idx = is_reference.nonzero().squeeze(1), (~is_reference).nonzero().squeeze(1)
        out[ref_idx] = plain(x[ref_idx], *args, **kwargs)
        # Group statistics over [row; reference] jointly: concatenate along the last spatial axis
        # (which axis is irrelevant to the statistics) and keep the row's half.
        joint = torch.cat([x[tgt_idx], x[rows[tgt_idx]]], dim=-1)
        out[tgt_idx] = plain(joint, *args, **kwargs)[..., :x.shape[-1]]
        return out


_CLASSES: dict[type, type] = {}


def _shared_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"StyleKitShared{base.__name__}", (_SharedNorm, base), {})
    return _CLASSES[base]


def _original(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_stylekit_original", module)


def shared_copy(norm: torch.nn.Module, context: CallContext) -> torch.nn.Module:
    """A copy of `norm` sharing its parameters, whose forward shares statistics within `context`."""
    norm = _original(norm)  # a second StyleAligned on the same chain replaces the first's sharing
    shared = copy.copy(norm)
    # Own containers (parameters, hooks, weight functions), the same tensors inside them: a
    # weight patch set on the copy while it is loaded never reaches into the original's dicts.
    for name, value in vars(norm).items():
        if isinstance(value, dict):
            shared.__dict__[name] = copy.copy(value)
        elif isinstance(value, list):
            shared.__dict__[name] = list(value)
    shared.__class__ = _shared_class(type(norm))
    shared.__dict__["_stylekit_context"] = context
    shared.__dict__["_stylekit_original"] = norm
    return shared


def group_norm_paths(model_patcher) -> list[str]:
    """Attribute paths ("diffusion_model.input_blocks.1.0.in_layers.0") of every UNet GroupNorm."""
    unet = model_patcher.get_model_object("diffusion_model")
    return [f"diffusion_model.{name}" for name, module in unet.named_modules()
            if isinstance(module, torch.nn.GroupNorm)]


def install_shared_group_norm(model_patcher, window: SigmaWindow) -> CallContext:
    """Share GroupNorm statistics with the reference row on `model_patcher` (a clone)."""
    context = CallContext(window)
    for path in group_norm_paths(model_patcher):
        model_patcher.add_object_patch(path, shared_copy(model_patcher.get_model_object(path), context))
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                       context.wrapper)
    return context


def is_shared_norm(module: object) -> bool:
    return isinstance(module, _SharedNorm)

