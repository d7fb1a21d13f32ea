"""The pre-RoPE image query recomputed from a core Flux double block is the query core attends with.

Inside a double-block replace on the tiny core Flux, image_stream_query(block, img, vec) is taken
from the block's inputs; core's attention override then shows the post-RoPE joint query. Rotated
with the block's own `pe`, ours must equal core's image part.
"""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch

from stylekit.attention.rotary import rotate
from stylekit.dit_adapters.flux_query import image_stream_query
from stylekit.tests.support.tiny_dits import TINY_FLUX, tiny_flux, tiny_flux_conditioning

TEXT_TOKENS = 6


def test_image_stream_query_rotated_by_pe_is_cores_post_rope_query():
    flux = tiny_flux(seed=2)
    m = flux.clone()
    ours, cores = {}, {}
    blocks = flux.model.diffusion_model.double_blocks

    def replace(index):
        def patch(args, extra):
            img = args["img"].clone()  # the block adds to img in place
            q = image_stream_query(blocks[index], img, args["vec"])
            ours[index] = rotate(q, args["pe"][:, :, TEXT_TOKENS:])
            return extra["original_block"](args)
        return patch

    def override(func, q, k, v, heads, *args, **kwargs):
        options = kwargs["transformer_options"]
        if options["block_type"] == "double":
            cores[options["block_index"]] = q[:, :, TEXT_TOKENS:].clone()
        return func(q, k, v, heads, *args, **kwargs)

    for i in range(TINY_FLUX["depth"]):
        m.set_model_patch_replace(replace(i), "dit", "double_block", i)
    m.model_options["transformer_options"]["optimized_attention_override"] = override
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 1).cpu()
    comfy.sample.sample_custom(m, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                               tiny_flux_conditioning(1, TEXT_TOKENS), [], torch.zeros_like(noise), disable_pbar=True)
    assert sorted(ours) == sorted(cores) == [0, 1]
    for i in ours:
        assert ours[i].shape == cores[i].shape == (2, 2, 16, 64)
        assert (ours[i] - cores[i]).abs().max() < 1e-5 * cores[i].abs().max()


def test_core_double_block_plus_our_term_equals_diffusers_ip_block():
    # End to end on one block: an XLabs file's weights (small widths) through our loader and term on
    # core's DoubleStreamBlock, against diffusers' FluxTransformerBlock with FluxIPAdapterAttnProcessor
    # on the same weights (core's own flux_to_diffusers key map), RoPE on both sides.
    import comfy.utils
    from comfy.ldm.flux.layers import EmbedND
    from diffusers.models.transformers.transformer_flux import (FluxIPAdapterAttnProcessor, FluxPosEmbed,
                                                                FluxTransformerBlock)

    from stylekit.attention.decoupled import ImageKV
    from stylekit.attention.dit_image_prompt import flux_ip_attention, merge_heads
    from stylekit.dit_adapters.xlabs_flux import xlabs_flux_from_state_dict
    from stylekit.tests.fixtures.dit_ip_adapters import xlabs_flux_shapes
    from stylekit.tests.fixtures.random_weights import random_state_dict

    hidden, heads = TINY_FLUX["hidden_size"], TINY_FLUX["num_heads"]
    core = tiny_flux(seed=4).model.diffusion_model
    block = core.double_blocks[1]
    theirs = FluxTransformerBlock(hidden, heads, hidden // heads)
    sd = core.state_dict()
    converted = {}
    wanted = {f"transformer_blocks.1.{k}" for k in theirs.state_dict()}   # core 0.33 also maps LoKr aliases
    for key, source in comfy.utils.flux_to_diffusers(TINY_FLUX).items():
        if key in wanted:
            if isinstance(source, tuple):
                source, (dim, start, size) = source
                converted[key[len("transformer_blocks.1."):]] = sd[source].narrow(dim, start, size)
            else:
                converted[key[len("transformer_blocks.1."):]] = sd[source]
    theirs.load_state_dict(converted)

    file = {k: v.float() for k, v in random_state_dict(xlabs_flux_shapes(4, 2, hidden, 48, 24), 5).items()}
    adapter = xlabs_flux_from_state_dict(file, "x")
    processor = FluxIPAdapterAttnProcessor(hidden, 48, num_tokens=(4,), scale=0.6)
    prefix = "double_blocks.1.processor.ip_adapter_double_stream_"
    processor.load_state_dict({f"to_{kv}_ip.0.{p}": file[f"{prefix}{kv}_proj.{p}"] for kv in "kv" for p in ("weight", "bias")})
    theirs.attn.set_processor(processor)

    g = torch.Generator().manual_seed(6)
    img, txt, vec = torch.randn(2, 16, hidden, generator=g), torch.randn(2, TEXT_TOKENS, hidden, generator=g), torch.randn(2, hidden, generator=g)
    tokens = adapter.projection(torch.randn(2, 24, generator=g))
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    ids = torch.cat([torch.zeros(TEXT_TOKENS, 3), torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], 1)])
    kernel = lambda q, k, v: merge_heads(torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))))
    with torch.no_grad():
        q = image_stream_query(block, img, vec)
        k_ip, v_ip = adapter.kv[1](tokens)
        term = flux_ip_attention(q, [ImageKV(k_ip, v_ip, 0.6)], kernel)
        img_out, txt_out = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=EmbedND(64, 10000, TINY_FLUX["axes_dim"])(ids[None]))
        want_txt, want_img = theirs(img, txt, vec, FluxPosEmbed(10000, TINY_FLUX["axes_dim"])(ids), {"ip_hidden_states": [tokens]})
    scale = want_img.abs().max()
    assert (img_out + term - want_img).abs().max() < 1e-5 * scale
    assert (txt_out - want_txt).abs().max() < 1e-5 * want_txt.abs().max()
    assert (img_out - want_img).abs().max() > 1e-3 * scale  # the term matters at this scale
