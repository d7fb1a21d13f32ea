"""InstantX SD3.5 IP term on a core MMDiT joint block against diffusers' IP block, same weights.

Core's JointBlock (SD3.5-Large layout: RMS QK-norm, no x-block self-attention) at 2 heads of 64;
diffusers' JointTransformerBlock gets the same weights through core's own mmdit_to_diffusers key
map and the SD3IPAdapterJointAttnProcessor2_0 loaded from the same adapter file dict as our
loader. Ours: raw x-stream q, k, v recomputed from the block (dit_adapters/mmdit_stream.py), the
adapter's norms, the joint IP term, added to the x part of core's joint attention output by an
attention override before the block's output projection.
"""
from __future__ import annotations

import comfy.ops
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

from stylekit.attention.dit_image_prompt import joint_ip_attention, merge_heads
from stylekit.dit_adapters.files import dit_adapter_from_state_dict
from stylekit.dit_adapters.mmdit_stream import x_stream_qkv
from stylekit.tests.fixtures.dit_ip_adapters import instantx_sd35_shapes
from stylekit.tests.fixtures.random_weights import random_state_dict, random_tensor

HIDDEN, HEADS, TEXT, IMAGE = 128, 2, 7, 16


def core_joint_block(seed):
    block = JointBlock(HIDDEN, HEADS, mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False, qk_norm="rms",
                       x_block_self_attn=False, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    block.load_state_dict({k: random_tensor(k, tuple(v.shape), seed, torch.float32) for k, v in block.state_dict().items()})
    return block


def diffusers_twin(core_block):
    sd = core_block.state_dict()
    converted = {}
    for key, source in comfy.utils.mmdit_to_diffusers({"depth": HIDDEN // 64, "num_blocks": 1}).items():
        if not key.startswith("transformer_blocks.0.") or "attn2" in key:
            continue
        name = key[len("transformer_blocks.0."):]
        if isinstance(source, tuple):
            source, (dim, start, size) = source
            converted[name] = sd[source[len("joint_blocks.0."):]].narrow(dim, start, size)
        else:
            converted[name] = sd[source[len("joint_blocks.0."):]]
    twin = JointTransformerBlock(HIDDEN, HEADS, 64, context_pre_only=False, qk_norm="rms_norm")
    twin.load_state_dict(converted)
    return twin


def test_core_joint_block_with_our_term_equals_diffusers_instantx_block():
    shapes = instantx_sd35_shapes(joint_blocks=1, hidden=HIDDEN, width=128, depth=4, queries=8, embed=40, time_channels=32)
    file = {part: {k: v.float() for k, v in random_state_dict(entries, 3).items()} for part, entries in shapes.items()}
    adapter = dit_adapter_from_state_dict(file, "ip-adapter.bin")
    core = core_joint_block(1)
    twin = diffusers_twin(core)
    scale = 0.7
    processor = SD3IPAdapterJointAttnProcessor2_0(HIDDEN, HIDDEN, 64, 128, scale)
    processor.load_state_dict({k.split(".", 1)[1]: v for k, v in file["ip_adapter"].items()})
    twin.attn.set_processor(processor)

    g = torch.Generator().manual_seed(2)
    x, context, c = torch.randn(2, IMAGE, HIDDEN, generator=g), torch.randn(2, TEXT, HIDDEN, generator=g), torch.randn(2, HIDDEN, generator=g)
    tokens, temb = adapter.resampler(torch.randn(2, 10, 40, generator=g), torch.tensor([900.0, 900.0]))
    kernel = lambda q, k, v: merge_heads(torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))))
    with torch.no_grad():
        layer = adapter.layers[0]
        q, k, v = x_stream_qkv(core, x, c)
        q, k = layer.queries_keys(q, k)
        term = joint_ip_attention(q, k, v, *layer.image_kv(tokens, temb), scale, kernel)

        def add_term(func, *args, **kwargs):
            out = func(*args, **kwargs)
            return torch.cat([out[:, :TEXT], out[:, TEXT:] + term], dim=1)  # x part, before x_block's proj

        ours_context, ours_x = core(context, x, c=c, transformer_options={"optimized_attention_override": add_term})
        plain_context, plain_x = core(context, x, c=c, transformer_options={})
        want_context, want_x = twin(x, context, c, {"ip_hidden_states": tokens, "temb": temb})
    size = want_x.abs().max()
    assert (ours_x - want_x).abs().max() < 1e-5 * size
    assert (ours_context - want_context).abs().max() < 1e-5 * want_context.abs().max()
    assert (plain_x - want_x).abs().max() > 1e-3 * size  # the term matters at this scale
