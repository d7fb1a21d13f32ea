"""The x-stream projections InstantX's SD3.5 IP-Adapter reads: a core MMDiT joint block's raw
q, k, v of the image tokens, before the block's own ln_q / ln_k (the adapter normalises q and k
with its own RMS norms), which core's attention override never sees (it gets them normed).

A joint-block replace recomputes them from the block's modules and inputs (adaLN modulation,
norm1, the fused qkv through core's weight casting), before running the original block; the IP
term then joins the x part of the joint attention output before the output projection, e.g. by
an attention override chained for that block. SD3.5-Large only: SD3.5-Medium's first blocks add
an image-only attention (x_block_self_attn) whose inputs differ.
"""
from __future__ import annotations

import comfy.ops
import torch
import torch.nn.functional as F
from comfy.ldm.modules.diffusionmodules.mmdit import modulate


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
    if block.x_block_self_attn or block.scale_mod_only:
        raise ValueError("the InstantX IP-Adapter is for SD3.5-Large joint blocks (no x-block self-attention, "
                         "shift-and-scale modulation)")
    shift_msa, scale_msa = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
    qkv = _linear(block.attn.qkv, modulate(block.norm1(x), shift_msa, scale_msa))
    return qkv.chunk(3, dim=-1)
