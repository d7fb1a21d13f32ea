"""One block grammar (host/blocks.py) for every node that takes blocks: the same names give the same
sites in IP-Adapter's block_weights, StyleAligned / Visual Style Prompting's custom_blocks and the
DreamBooth / B-LoRA block list."""
from __future__ import annotations

import pytest

from stylekit.host.block_map import block_map
from stylekit.host.block_weights import CUSTOM as IPA_CUSTOM
from stylekit.host.block_weights import block_weights_for
from stylekit.host.blocks import MAX_ENTRY, BlockNameError, parse_block_list
from stylekit.host.layer_select import CUSTOM as SHARING_CUSTOM
from stylekit.tests.support.tiny_dits import tiny_flux, tiny_mmdit
from stylekit.training.targets import BLOCK_LIST, select_sites

OUTPUTS = [("output", n) for n in range(3, 12)]
# SD1.5 names and the blocks they mean, written from DESIGN §2's table (not from the parser).
SD15_NAMES = [
    ("output 4", [("output", 4)]),
    ("output_3-5", [("output", 3), ("output", 4), ("output", 5)]),
    ("output", OUTPUTS),                                           # a bare kind: every block of it
    ("up_blocks.1", [("output", 3), ("output", 4), ("output", 5)]),  # a diffusers prefix
    ("mid_block", [("middle", 0)]),
    ("unet.down_blocks.2.attentions.1, mid", [("input", 8), ("middle", 0)]),
    ("input 7-8;\nUP_BLOCKS.3.attentions.0", [("input", 7), ("input", 8), ("output", 9)]),
]


def _ip_adapter_blocks(model, names: str) -> set:
    weights = block_weights_for(block_map(model), IPA_CUSTOM, names)
    return {(b, n) for (b, n, _), w in weights.items() if w != 0.0}


def _sharing_blocks(model, names: str) -> set:
    from stylekit.nodes.style_aligned import _resolve

    return set(_resolve("StyleKit StyleAligned", model, SHARING_CUSTOM, names))


def _training_blocks(model, names: str) -> set:
    return {s.block for s in select_sites(model, BLOCK_LIST, names)}


@pytest.mark.parametrize("names, blocks", SD15_NAMES)
def test_the_same_block_names_give_the_same_sites_in_every_node(sd15, names, blocks):
    model = sd15.model
    assert _ip_adapter_blocks(model, names) == set(blocks)
    assert _sharing_blocks(model, names) == set(blocks)
    assert _training_blocks(model, names) == set(blocks)


def test_a_block_weights_dict_reads_its_keys_in_the_same_grammar(sd15):
    weights = block_weights_for(block_map(sd15.model), IPA_CUSTOM, '{"output": 0.5, "up_blocks.1": 1.0}')
    by_block = {(b, n): w for (b, n, _), w in weights.items()}
    assert {k for k, w in by_block.items() if w} == set(OUTPUTS)
    assert by_block[("output", 3)] == 1.0 and by_block[("output", 9)] == 0.5 and by_block[("input", 8)] == 0.0


def test_an_unknown_name_is_refused_the_same_way_by_every_node(sd15):
    for resolve in (_ip_adapter_blocks, _sharing_blocks, _training_blocks):
        with pytest.raises(ValueError, match="'output 2' names no attention block of this model; it has: input 1"):
            resolve(sd15.model, "output 3, output 2")


def test_dit_blocks_are_named_by_kind_range_patch_key_or_diffusers_name(comfy_host):
    flux = block_map(tiny_flux())
    assert [s.block for s in parse_block_list(flux, "double 0-18")] == [("double", 0), ("double", 1)]
    assert [s.block for s in parse_block_list(flux, "single 0-37")] == [("single", 0), ("single", 1)]
    assert [s.block for s in parse_block_list(flux, "single_transformer_blocks.1, double_block 1")] == [
        ("single", 1), ("double", 1)]
    assert [s.block for s in parse_block_list(flux, "transformer_blocks")] == [("double", 0), ("double", 1)]
    sd3 = block_map(tiny_mmdit())
    for name in ("joint 1", "double 1", "double_block 1", "transformer.transformer_blocks.1"):
        assert [s.block for s in parse_block_list(sd3, name)] == [("joint", 1)], name


def test_names_are_bounded_and_an_empty_list_is_refused(comfy_host):
    flux = block_map(tiny_flux())
    with pytest.raises(BlockNameError, match="too long"):
        parse_block_list(flux, "double" + "_" * MAX_ENTRY + "1")
    with pytest.raises(BlockNameError, match="empty"):
        parse_block_list(flux, " ,\n ;")
