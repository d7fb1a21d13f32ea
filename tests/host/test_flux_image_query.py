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
from stylekit.tests.support.tiny_dit_blocks import TINY_FLUX, tiny_flux, tiny_flux_conditioning

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
