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
