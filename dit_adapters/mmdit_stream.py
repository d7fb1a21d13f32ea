"""The x-stream projections InstantX's SD3.5 IP-Adapter reads: a core MMDiT joint block's raw
q, k, v of the image tokens, with q and k normalised by the adapter's own RMS norms instead of the
block's ln_q / ln_k.

Core's attention override sees v and the block-normed q, k. When ln_q / ln_k are RMSNorms (SD3.5)
the adapter's norms follow from those without the raw projections: both divide the same raw
vector by its RMS, so n_adapter(x) = ln(x) · (w_adapter / w_block) (`renormed`), as long as no
gain of the block is ~0 (`rms_qk_gains`). Otherwise a joint-block replace recomputes them from
the block's modules and inputs (`x_stream_qkv`: adaLN modulation, norm1, the fused qkv through
core's weight casting: a second qkv projection of every image token). SD3.5-Large only:
SD3.5-Medium's first blocks add an image-only attention (x_block_self_attn) whose inputs differ.
"""
from __future__ import annotations

import comfy.ops
import torch
import torch.nn.functional as F
from comfy.ldm.modules.diffusionmodules.mmdit import RMSNorm, modulate

GAIN_FLOOR = 1e-3   # smallest |gain| / max |gain| of ln_q / ln_k that renormed() divides by


def _linear(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(linear, "weight_function"):
        weight, bias, stream = comfy.ops.cast_bias_weight(linear, x, offloadable=True)
        out = F.linear(x, weight, bias)
        comfy.ops.uncast_bias_weight(linear, weight, bias, stream)
        return out
    return linear(x)


def x_stream_qkv(joint_block: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of a core JointBlock's x stream, q and k before ln_q / ln_k.
    Shapes: x [B, N, hidden], c [B, hidden] -> 3 × [B, N, hidden]."""
    block = joint_block.x_block
    check_large_joint_block(joint_block)
    shift_msa, scale_msa = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    qkv = _linear(block.attn.qkv, modulate(block.norm1(x), shift_msa, scale_msa))
    return qkv.chunk(3, dim=-1)


def check_large_joint_block(joint_block: torch.nn.Module) -> None:
    block = joint_block.x_block
    if block.x_block_self_attn or block.scale_mod_only:
        raise ValueError("the InstantX IP-Adapter is for SD3.5-Large joint blocks (no x-block self-attention, "
                         "shift-and-scale modulation)")


def rms_qk_gains(joint_block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The x stream's ln_q, ln_k gains [head_dim] when both are RMSNorms with every gain away from 0, else None."""
    attn = joint_block.x_block.attn
    gains = []
    for norm in (attn.ln_q, attn.ln_k):
        weight = getattr(norm, "weight", None) if isinstance(norm, RMSNorm) else None
        if weight is None or not bool(weight.abs().min() > GAIN_FLOOR * weight.abs().max()):
            return None
        gains.append(weight)
    return gains[0], gains[1]


def renormed(x: torch.Tensor, block_gain: torch.Tensor, adapter_gain: torch.Tensor) -> torch.Tensor:
    """The adapter's RMS norm of a raw projection, from the block's RMS-normed one: ln(x) · w_adapter / w_block
    per head. Shapes: x [B, N, H·D], gains [D] -> [B, N, H·D]."""
    ratio = (adapter_gain.float() / block_gain.float()).to(device=x.device, dtype=x.dtype)
    return (x.unflatten(-1, (-1, ratio.shape[0])) * ratio).flatten(-2)
