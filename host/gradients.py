"""Autograd inside a ComfyUI prompt: the one place StyleKit handles it (DESIGN §0, last bullet).

ComfyUI runs every prompt under `torch.inference_mode()`, so the checkpoints, conditionings and
latents that reach a node are *inference tensors*. Leaving inference mode is not enough to
backpropagate through them: autograd refuses to save an inference tensor for backward
("Inference tensors cannot be saved for backward"), and every frozen weight downstream of a
trainable one is saved (the input gradient of a linear layer needs its weight). The fix is to
work on normal tensors with the same values:

- `autograd_enabled()`: leave inference mode and turn gradients on, for the duration of a block;
- `thawed(value)`: a tensor, or a dict/list/tuple of them (a CONDITIONING, a LATENT), whose
  inference tensors are replaced by normal clones;
- `thaw_parameters_(module)`: the same in place for a module's parameters and buffers, values
  unchanged; no second copy of the model is kept, so this is the way for the UNet (training,
  guidance through the UNet). The module's behaviour is unchanged, only its tensors' kind;
- `differentiable_copy(module, dtype, device, without)`: a frozen deep copy built from normal tensors, for
  small modules a method wants in its own precision or untouched (a VAE decoder in fp32 for
  style guidance, a discriminator).

Frozen stays frozen: parameters keep `requires_grad=False`, so gradients flow *through* them
to whatever does require grad (LoRA weights, a latent being guided).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Leave ComfyUI's inference mode and enable gradients inside the block."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _thaw_tensor(t: torch.Tensor) -> torch.Tensor:
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def thawed(value: T) -> T:
    """`value` with every inference tensor in it (nested in dicts, lists, tuples) cloned into a
    normal tensor; anything else is returned as it is. The input is not modified."""
    if isinstance(value, torch.Tensor):
        return _thaw_tensor(value)
    if isinstance(value, dict):
        return type(value)((k, thawed(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(thawed(v) for v in value)
    return value


def thaw_parameters_(module: torch.nn.Module) -> int:
    """Replace, in place, the module's parameters and buffers that are inference tensors by
    normal tensors holding the same values (parameters keep their requires_grad flag).
    Returns how many were replaced; 0 when there was nothing to do (a second call is free)."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    replaced += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    replaced += 1
    return replaced


def differentiable_copy(module: torch.nn.Module, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, without: tuple[str, ...] = ()) -> torch.nn.Module:
    """A deep copy of `module` made of normal tensors (optionally cast), frozen and in eval
    mode: gradients flow through it to its inputs. The original is not touched. `without` names
    direct submodules left out of the copy (None there), e.g. a VAE's encoder when only its
    decoder is differentiated."""
    # deepcopy's memo maps a submodule to None, so it is neither copied nor shared.
    memo = {id(getattr(module, name)): None for name in without if getattr(module, name, None) is not None}
    with torch.inference_mode(False):
        twin = copy.deepcopy(module, memo)
        thaw_parameters_(twin)  # deepcopy keeps a tensor's kind on some paths; make sure
        twin.to(device=device, dtype=dtype)
    twin.requires_grad_(False)
    return twin.eval()
