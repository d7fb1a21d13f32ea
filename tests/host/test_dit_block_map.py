"""One site map for UNets and DiTs (DESIGN §2, §6): names agree with diffusers' modules for the same
architecture, and a probe on every site's ComfyUI key is hit exactly once in one forward pass."""
from __future__ import annotations

import pytest
import torch

from stylekit.host.block_map import FLUX_DOUBLE, FLUX_SINGLE, MMDIT_JOINT, block_map
from stylekit.tests.support.diffusers_dit import diffusers_twin_and_key_map
from stylekit.tests.support.tiny_dits import dit_conditioning, tiny_flux, tiny_mmdit


@pytest.fixture(params=["sd15", "sdxl", "flux_dev", "sd35", "tiny_flux", "tiny_sd35_medium"])
def any_model(request):
    if request.param == "tiny_flux":
        return tiny_flux()
    if request.param == "tiny_sd35_medium":
        return tiny_mmdit(x_block_self_attn_layers=[0])
    loaded = request.getfixturevalue(request.param)
    return loaded.model if hasattr(loaded, "clip") else loaded  # a checkpoint, or a MODEL


def _block_classes():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock

    return (FluxTransformerBlock, FluxSingleTransformerBlock, JointTransformerBlock, Transformer2DModel)


def test_every_site_is_a_diffusers_block_whose_weights_are_the_sites_own(any_model):
    """The diffusers name of each site is a transformer block of the diffusers model of the same
    architecture, every such block is a site, and core's key map sends the block's weights to the
    site's own module in the ComfyUI model."""
    twin, key_map = diffusers_twin_and_key_map(any_model)
    modules = dict(twin.named_modules())
    bm = block_map(any_model)
    reference = {name for name, m in modules.items() if isinstance(m, _block_classes())}
    assert {s.diffusers_name for s in bm} == reference
    comfy_keys = set(any_model.model.diffusion_model.state_dict())
    for site in bm:
        # Fused weights map to (ComfyUI key, slice): the key is what names the module.
        mapped = {ldm[0] if isinstance(ldm, tuple) else ldm for key, ldm in key_map.items()
                  if key.startswith(site.diffusers_name + ".")}
        assert mapped and all(k.startswith(site.module_path + ".") for k in mapped), site
        # core's SD3 map is a superset (x_block.attn2 everywhere, the last block's context MLP).
        assert mapped & comfy_keys
        block = modules[site.diffusers_name]
        has_image_self_attention = isinstance(getattr(block, "attn2", None), torch.nn.Module) and site.is_dit
        assert has_image_self_attention == bool(site.extra_attention)


def test_dit_sites_carry_patch_keys_stream_order_and_global_adapter_numbers(flux_dev, sd35):
    flux = block_map(flux_dev)
    assert [(s.block, s.patch_key, s.kind, s.ip_adapter_keys) for s in flux] == [
        (("double", 0), ("double_block", 0), FLUX_DOUBLE, (0,)), (("single", 0), ("single_block", 0), FLUX_SINGLE, (1,))]
    assert all(s.stream_order == ("text", "image") and s.width == 3072 and s.heads == 24 for s in flux)
    sd3 = block_map(sd35)
    assert [(s.block, s.patch_key, s.kind) for s in sd3] == [
        (("joint", 0), ("double_block", 0), MMDIT_JOINT), (("joint", 1), ("double_block", 1), MMDIT_JOINT)]
    assert all(s.stream_order == ("context", "x") and s.width == 128 and not s.extra_attention for s in sd3)
    assert "single_transformer_blocks.0" in flux.describe() and "context then x" in sd3.describe()


def _forward(model, transformer_options: dict) -> None:
    import comfy.model_management

    comfy.model_management.load_model_gpu(model)
    if block_map(model).is_dit:
        cond = dit_conditioning(model)[0]
        model.model.apply_model(torch.randn(1, 16, 16, 16), torch.tensor([0.5]), c_crossattn=cond[0],
                                y=cond[1]["pooled_output"], guidance=torch.tensor([3.5]),
                                transformer_options=transformer_options)
        return
    unet = model.model
    context = torch.randn(1, 77, block_map(model).sites[0].context_dim)
    extra = {"y": torch.randn(1, unet.adm_channels)} if unet.adm_channels else {}
    unet.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context=context,
                         transformer_options=transformer_options, **extra)


def test_a_probe_on_every_site_is_hit_exactly_once_in_one_forward_pass(any_model):
    from comfy.ldm.modules.attention import optimized_attention

    bm = block_map(any_model)
    m = any_model.clone()
    hits: dict[tuple, int] = {}

    def count(key):
        hits[key] = hits.get(key, 0) + 1

    for site in bm:
        if site.is_dit:
            def probe(args, extra, key=site.patch_key):
                count(key)
                return extra["original_block"](args)
            m.set_model_patch_replace(probe, "dit", *site.patch_key)
        else:
            for name, number, index in site.layers():
                for attn in ("attn1", "attn2"):
                    def attn_probe(q, k, v, extra_options, key=(attn, name, number, index)):
                        count(key)
                        return optimized_attention(q, k, v, extra_options["n_heads"])
                    getattr(m, f"set_model_{attn}_replace")(attn_probe, name, number, index)
    _forward(m, m.model_options["transformer_options"])
    expected = [s.patch_key for s in bm if s.is_dit] + [
        (attn, *layer) for s in bm if not s.is_dit for layer in s.layers() for attn in ("attn1", "attn2")]
    assert hits == {key: 1 for key in expected}
