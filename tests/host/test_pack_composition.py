"""StyleKit's IP-Adapter and the incumbent IP-Adapter pack on one model, in either order.

The incumbent's protocol, written out here from its behaviour (not its code): it registers one
attn2 replace per key — (block, number) on SD1.5, (block, number, index) on SDXL — on a copy of
transformer_options; when a replace already sits at its key it calls `.add(callback, **kwargs)`
on it, and its replace computes plain attention plus every callback's output inside
[sigma_end, sigma_start]."""
from __future__ import annotations

import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention

from stylekit.host.block_map import block_map
from stylekit.patching.ip_adapter import IPAdapterSettings, apply_ip_adapter

from .test_ip_adapter_patch import Hits, _adapter_for, _sample, _tokens


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


def incumbent_image_attention(out, q, k, v, extra_options, weight, image_k, image_v, hits, key, **_):
    """The incumbent's callback: weight · Attn(q, K_img, V_img), one fixed image K/V per layer."""
    hits.add(key)
    b = q.shape[0]
    return weight * optimized_attention(q, image_k.to(q).expand(b, -1, -1), image_v.to(q).expand(b, -1, -1),
                                        extra_options["n_heads"])


def apply_incumbent(model, sdxl: bool, hits: Hits, weight: float = 1.0):
    m = model.clone()
    to = m.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    g = torch.Generator().manual_seed(7)
    for site in block_map(m):
        for layer in site.layers():
            key = layer if sdxl else layer[:2]
            kwargs = dict(weight=weight, image_k=torch.randn(1, 4, site.channels, generator=g),
                          image_v=torch.randn(1, 4, site.channels, generator=g), hits=hits, key=key,
                          sigma_start=1e9, sigma_end=0.0)
            if key in to["patches_replace"]["attn2"]:
                to["patches_replace"]["attn2"][key].add(incumbent_image_attention, **kwargs)
            else:
                to["patches_replace"]["attn2"][key] = IncumbentReplace(incumbent_image_attention, **kwargs)
    m.model_options["transformer_options"] = to
    return m


@pytest.mark.parametrize("model_name", ["sd15", "sdxl"])
def test_both_orders_apply_both_adapters(request, model_name):
    checkpoint = request.getfixturevalue(model_name)
    sdxl = model_name == "sdxl"
    adapter = _adapter_for(checkpoint)
    ours = lambda model: apply_ip_adapter(model, adapter, _tokens(adapter), IPAdapterSettings(weight=1.0))
    expected_keys = {layer if sdxl else layer[:2] for site in block_map(checkpoint.model) for layer in site.layers()}

    only_ours = _sample(checkpoint, ours(checkpoint.model))
    hits = {name: Hits() for name in ("theirs", "theirs_first", "ours_first")}
    only_theirs = _sample(checkpoint, apply_incumbent(checkpoint.model, sdxl, hits["theirs"]))
    theirs_then_ours = _sample(checkpoint, ours(apply_incumbent(checkpoint.model, sdxl, hits["theirs_first"])))
    ours_then_theirs = _sample(checkpoint, apply_incumbent(ours(checkpoint.model), sdxl, hits["ours_first"]))

    assert hits["theirs_first"] == hits["ours_first"] == expected_keys   # theirs ran at every layer, both orders
    # The same sum either way (up to float rounding: (a + d) + i against (a + i) + (a + d - a), over
    # three steps) ...
    order_gap = (ours_then_theirs - theirs_then_ours).abs().max()
    torch.testing.assert_close(ours_then_theirs, theirs_then_ours, rtol=1e-3, atol=2e-3)
    for single in (only_ours, only_theirs):  # ... and far from either adapter alone
        assert (ours_then_theirs - single).abs().max() > 20 * order_gap + 1e-3


def test_a_pack_appending_through_the_old_protocol_gets_an_error_naming_the_order_that_works(sd15):
    adapter = _adapter_for(sd15)
    m = apply_ip_adapter(sd15.model, adapter, _tokens(adapter), IPAdapterSettings())
    patch = next(iter(m.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    with pytest.raises(RuntimeError, match="before the StyleKit node"):
        patch.set_new_condition(weight=1.0)
