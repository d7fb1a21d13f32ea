"""The query XLabs' Flux IP-Adapter reads: a core Flux double block's image-stream query after
QK-norm and before RoPE, which core never exposes (the attention override sees post-RoPE q).

A double-block replace recomputes it from the block's own modules and the block's inputs; only
the query third of the fused qkv projection is evaluated (about 1/12 of the block's image-stream
matmuls), through core's cast_bias_weight, so LoRA weight patches, low-VRAM casting and the
model's dtype apply as in the block itself. Call it *before* running the original block: core's
DoubleStreamBlock adds its attention and MLP outputs to `img` in place.
"""
from __future__ import annotations

import comfy.ops
import torch
import torch.nn.functional as F
from comfy.ldm.flux.layers import apply_mod


def _query_projection(linear: torch.nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` outputs of a (fused qkv) Linear, with core's weight casting and patches."""
    if hasattr(linear, "weight_function"):
        weight, bias, stream = comfy.ops.cast_bias_weight(linear, x, offloadable=True)
        out = F.linear(x, weight[:width], None if bias is None else bias[:width])
        comfy.ops.uncast_bias_weight(linear, weight, bias, stream)
        return out
    bias = None if linear.bias is None else linear.bias[:width]
    return F.linear(x, linear.weight[:width].to(x.dtype), None if bias is None else bias.to(x.dtype))


def image_stream_query(block: torch.nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Q_img of a core Flux.1 DoubleStreamBlock: RMS-QK-normed, no RoPE.
    Shapes: img [B, N, hidden], vec [B, hidden] -> [B, heads, N, hidden/heads]."""
    if not getattr(block, "modulation", False):
        raise ValueError("this Flux variant modulates its blocks globally (Flux 2 / Chroma); "
                         "the XLabs IP-Adapter is for Flux.1 double blocks")
    mod, _ = block.img_mod(vec)
    x = apply_mod(block.img_norm1(img), 1 + mod.scale, mod.shift)
    q = _query_projection(block.img_attn.qkv, x, block.hidden_size)
    q = q.view(q.shape[0], q.shape[1], block.num_heads, -1).transpose(1, 2)
    return block.img_attn.norm.query_norm(q).to(q.dtype)
