"""Test-only custom node pack: the incumbent IP-Adapter pack's attention-patch protocol, written
out from its behaviour (not its code), so server tests can put it and StyleKit on one model.

Protocol: one attn2 replace per key — (block, number) on SD1.5, (block, number, index) on SDXL —
set on a copy of transformer_options; if a replace already sits at the key, `.add(callback,
**kwargs)` is called on it. Its replace returns plain attention plus every callback's output
within [sigma_end, sigma_start]. The callback here adds weight · Attn(q, K_img, V_img) with fixed
random image keys/values per layer (seeded), standing in for the incumbent's adapter.
Linked into the test server's custom_nodes by the root conftest; never part of the pack."""
from __future__ import annotations

import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention


class IncumbentReplace:
    def __init__(self, callback, **kwargs):
        self.callbacks = [(callback, kwargs)]

    def add(self, callback, **kwargs):
        self.callbacks.append((callback, kwargs))

    def __call__(self, q, k, v, extra_options):
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0]) if "sigmas" in extra_options else 999999999.9
        for callback, kwargs in self.callbacks:
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def image_attention(out, q, k, v, extra_options, weight, image_k, image_v, **_):
    b = q.shape[0]
    return weight * optimized_attention(q, image_k.to(q).expand(b, -1, -1), image_v.to(q).expand(b, -1, -1),
                                        extra_options["n_heads"])


def _sites(unet):
    """(block, number, depth, channels) of every transformer, as core names its blocks."""
    for kind, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    yield kind, number, len(layer.transformer_blocks), layer.transformer_blocks[0].attn2.to_k.out_features
    for layer in unet.middle_block:
        if isinstance(layer, SpatialTransformer):
            yield "middle", 0, len(layer.transformer_blocks), layer.transformer_blocks[0].attn2.to_k.out_features


class TestIncumbentIPAdapterProtocol:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "weight": ("FLOAT", {"default": 1.0, "min": -5.0, "max": 5.0}),
                             "seed": ("INT", {"default": 7, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    def apply(self, model, weight, seed):
        m = model.clone()
        unet = m.get_model_object("diffusion_model")
        sdxl = m.model.adm_channels > 0
        to = m.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        g = torch.Generator().manual_seed(seed)
        for block, number, depth, channels in _sites(unet):
            for index in range(depth):
                key = (block, number, index) if sdxl else (block, number)
                kwargs = dict(weight=weight, image_k=torch.randn(1, 4, channels, generator=g),
                              image_v=torch.randn(1, 4, channels, generator=g), sigma_start=1e9, sigma_end=0.0)
                if key in to["patches_replace"]["attn2"]:
                    to["patches_replace"]["attn2"][key].add(image_attention, **kwargs)
                else:
                    to["patches_replace"]["attn2"][key] = IncumbentReplace(image_attention, **kwargs)
                if not sdxl:
                    break  # one block-wide replace per SD1.5 block
        m.model_options["transformer_options"] = to
        return (m,)


NODE_CLASS_MAPPINGS = {"TestIncumbentIPAdapterProtocol": TestIncumbentIPAdapterProtocol}
