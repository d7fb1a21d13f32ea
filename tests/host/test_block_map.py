"""The block map against DESIGN §2 and against ComfyUI's runtime addressing."""
from __future__ import annotations

import pytest
import torch

from stylekit.host.block_map import block_map

SD15_TABLE = [
    (("input", 1), "down_blocks.0.attentions.0", 1), (("input", 2), "down_blocks.0.attentions.1", 3),
    (("input", 4), "down_blocks.1.attentions.0", 5), (("input", 5), "down_blocks.1.attentions.1", 7),
    (("input", 7), "down_blocks.2.attentions.0", 9), (("input", 8), "down_blocks.2.attentions.1", 11),
    (("middle", 0), "mid_block.attentions.0", 31),
    (("output", 3), "up_blocks.1.attentions.0", 13), (("output", 4), "up_blocks.1.attentions.1", 15),
    (("output", 5), "up_blocks.1.attentions.2", 17), (("output", 6), "up_blocks.2.attentions.0", 19),
    (("output", 7), "up_blocks.2.attentions.1", 21), (("output", 8), "up_blocks.2.attentions.2", 23),
    (("output", 9), "up_blocks.3.attentions.0", 25), (("output", 10), "up_blocks.3.attentions.1", 27),
    (("output", 11), "up_blocks.3.attentions.2", 29),
]

SDXL_TABLE = [  # (id, diffusers name, depth, first IP-Adapter key)
    (("input", 4), "down_blocks.1.attentions.0", 2, 1), (("input", 5), "down_blocks.1.attentions.1", 2, 5),
    (("input", 7), "down_blocks.2.attentions.0", 10, 9), (("input", 8), "down_blocks.2.attentions.1", 10, 29),
    (("middle", 0), "mid_block.attentions.0", 10, 121),
    (("output", 0), "up_blocks.0.attentions.0", 10, 49), (("output", 1), "up_blocks.0.attentions.1", 10, 69),
    (("output", 2), "up_blocks.0.attentions.2", 10, 89), (("output", 3), "up_blocks.1.attentions.0", 2, 109),
    (("output", 4), "up_blocks.1.attentions.1", 2, 113), (("output", 5), "up_blocks.1.attentions.2", 2, 117),
]


def test_sd15_map_has_the_real_numbering_names_and_ip_adapter_keys(sd15):
    bm = block_map(sd15.model)
    assert [(s.block, s.diffusers_name, s.ip_adapter_keys) for s in bm] == [
        (b, n, (k,)) for b, n, k in SD15_TABLE]
    assert [s.transformer_index for s in bm] == list(range(16))
    assert all(s.depth == 1 and s.context_dim == 768 for s in bm)


def test_sdxl_map_has_the_real_numbering_depths_and_ip_adapter_keys(sdxl):
    bm = block_map(sdxl.model)
    assert [(s.block, s.diffusers_name, s.depth, s.ip_adapter_keys[0]) for s in bm] == SDXL_TABLE
    keys = sorted(k for s in bm for k in s.ip_adapter_keys)
    assert keys == list(range(1, 140, 2))  # 70 cross-attention layers, odd numbers 1..139
    assert len(bm.layers()) == 70 and all(s.context_dim == 2048 for s in bm)


def test_lookup_by_either_name_and_a_clear_error_for_unknown_blocks(sdxl):
    bm = block_map(sdxl.model)
    assert bm.site(("output", 1)).diffusers_name == "up_blocks.0.attentions.1"
    assert bm.by_diffusers_name("down_blocks.2.attentions.1").block == ("input", 8)
    with pytest.raises(KeyError, match="no attention block middle 1"):
        bm.site(("middle", 1))


# Every site, UNet or DiT, is hit exactly once by a probe: tests/host/test_dit_block_map.py.


def test_a_model_without_unet_blocks_is_refused_with_a_clear_message():
    with pytest.raises(TypeError, match="not a UNet with input/middle/output blocks nor a Flux"):
        block_map(torch.nn.Linear(2, 2))
