"""Replace patches installed through patching.attention_replace compose and stay on their clone."""
from __future__ import annotations

import torch

from stylekit.patching.attention_replace import ReplacePatch, install_replace, installed_replace

LAYER = ("output", 1, 0)


class AddConstant(ReplacePatch):
    def __init__(self, previous, value):
        super().__init__(previous)
        self.value = value
        self.devices = []

    def __call__(self, q, k, v, extra_options):
        return self.attention(q, k, v, extra_options) + self.value

    def to_device(self, device):
        self.devices.append(str(device))


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 16, 4 * 8, generator=g) for _ in range(3)]


def test_a_second_patch_wraps_the_first_and_both_apply(sdxl):
    m = sdxl.model.clone()
    install_replace(m, "attn2", LAYER, lambda prev: AddConstant(prev, 1.0))
    outer = install_replace(m, "attn2", LAYER, lambda prev: AddConstant(prev, 10.0))
    q, k, v = _qkv()
    plain = ReplacePatch().attention(q, k, v, {"n_heads": 4})
    assert torch.allclose(outer(q, k, v, {"n_heads": 4}), plain + 11.0)


def test_another_packs_block_wide_replace_becomes_the_plain_path(sdxl):
    m = sdxl.model.clone()
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(extra_options["n_heads"])
        return torch.zeros_like(q)

    m.set_model_attn2_replace(foreign, "output", 1)  # block-wide, no index: as many packs do
    assert installed_replace(m, "attn2", LAYER) is foreign
    ours = install_replace(m, "attn2", LAYER, lambda prev: AddConstant(prev, 2.0))
    q, k, v = _qkv()
    assert torch.equal(ours(q, k, v, {"n_heads": 4}), torch.full_like(q, 2.0)) and calls == [4]


def test_installing_on_a_clone_leaves_the_original_untouched(sdxl):
    before = installed_replace(sdxl.model, "attn2", LAYER)
    m = sdxl.model.clone()
    install_replace(m, "attn2", LAYER, lambda prev: AddConstant(prev, 1.0))
    assert installed_replace(sdxl.model, "attn2", LAYER) is before is None


def test_device_moves_reach_the_wrapped_patch(sdxl):
    m = sdxl.model.clone()
    inner = install_replace(m, "attn2", LAYER, lambda prev: AddConstant(prev, 1.0))
    outer = install_replace(m, "attn2", LAYER, lambda prev: AddConstant(prev, 1.0))
    m.model_patches_to(torch.device("cpu"))
    assert inner.devices == ["cpu"] and outer.devices == ["cpu"]


def test_an_attention_override_in_transformer_options_still_runs_on_our_patched_layers(sd15):
    # The override slot (DESIGN §6) wraps core's attention functions; our plain path must reach
    # it with the layer's transformer options and attn_precision, as core's own attention does.
    import comfy.samplers

    from stylekit.host.block_map import block_map
    from stylekit.tests.host.sharing_support import encode, sample

    m = sd15.model.clone()
    layers = block_map(m).layers()
    for layer in layers:
        install_replace(m, "attn1", layer, lambda prev: AddConstant(prev, 0.0))
    seen = []

    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        options = kwargs["transformer_options"]
        if k.shape[1] != 77:  # self-attention: only our patched attn1 layers run it
            seen.append((options["block"], options["block_index"], "attn_precision" in kwargs))
        return func(*args, **kwargs)

    m.model_options["transformer_options"]["optimized_attention_override"] = override
    positive, negative = encode(sd15.clip, "waves"), encode(sd15.clip, "")
    with_override = sample(m, positive, negative, batch=1, steps=1)
    assert len(seen) == len(layers) and all(has_precision for *_, has_precision in seen)
    assert {(block, index) for block, index, _ in seen} == {(layer[:2], layer[2]) for layer in layers}
    del m.model_options["transformer_options"]["optimized_attention_override"]
    assert torch.equal(with_override, sample(m, positive, negative, batch=1, steps=1))
