"""Block weight specs resolve through the block map exactly as diffusers resolves its dicts."""
from __future__ import annotations

import pytest

from stylekit.host.block_map import block_map
from stylekit.host.block_weights import (ALL, CUSTOM, LAYOUT, STYLE, STYLE_LAYOUT, BlockWeightsError,
                                             block_weights_for, parse_spec, resolve_block_weights)
from stylekit.tests.support.diffusers_unet import diffusers_twin

DIFFUSERS_DICTS = {
    "sd15": [{"up": {"block_1": [0.0, 1.0, 0.0]}}, {"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": 0.25},
             {"down": 0.7}, {"up": {"block_3": [0.2]}, "mid": [0.9]}, 0.6],
    "sdxl": [{"up": {"block_0": [0.0, 1.0, 0.0]}}, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
             {"down": {"block_1": 0.3}, "mid": 1.5, "up": {"block_1": [0.1, 0.2, 0.3]}}, 1.0],
}


def _by_diffusers_name(bm, weights: dict) -> dict[str, float]:
    """Collapse per-layer weights to one per diffusers attention (every depth shares it here)."""
    out = {}
    for site in bm:
        values = {weights[layer] for layer in site.layers()}
        assert len(values) == 1
        out[site.diffusers_name] = values.pop()
    return out


@pytest.mark.parametrize("model_name", ["sd15", "sdxl"])
def test_diffusers_style_dicts_resolve_like_diffusers_own_expansion(request, model_name):
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    checkpoint = request.getfixturevalue(model_name)
    bm = block_map(checkpoint.model)
    twin = diffusers_twin(checkpoint.model)
    for spec in DIFFUSERS_DICTS[model_name]:
        (expanded,) = _maybe_expand_lora_scales(twin, [spec], default_scale=0.0)
        if not isinstance(expanded, dict):
            expanded = {s.diffusers_name: expanded for s in bm}
        ours = _by_diffusers_name(bm, resolve_block_weights(bm, spec))
        assert ours == {name: float(expanded[name]) for name in ours}, spec


@pytest.mark.parametrize("model_name,preset,expected", [
    ("sdxl", STYLE, {"up_blocks.0.attentions.1"}),
    ("sdxl", STYLE_LAYOUT, {"up_blocks.0.attentions.1", "down_blocks.2.attentions.1"}),
    ("sdxl", LAYOUT, {"down_blocks.2.attentions.1"}),
    ("sd15", STYLE, {"up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}),
    ("sd15", STYLE_LAYOUT, {"down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
                            "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}),
    ("sd15", LAYOUT, {"down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0"}),
])
def test_instantstyle_presets_select_the_official_blocks(request, model_name, preset, expected):
    bm = block_map(request.getfixturevalue(model_name).model)
    weights = _by_diffusers_name(bm, block_weights_for(bm, preset))
    assert {name for name, w in weights.items() if w} == expected
    assert set(weights.values()) <= {0.0, 1.0}


def test_all_blocks_is_one_everywhere(sdxl):
    bm = block_map(sdxl.model)
    assert set(block_weights_for(bm, ALL).values()) == {1.0} and len(block_weights_for(bm, ALL)) == 70


def test_named_blocks_take_comfyui_ids_diffusers_names_and_prefixes(sd15):
    bm = block_map(sd15.model)
    by_id = resolve_block_weights(bm, {"output 3": 1.0, "middle": 0.5})
    by_name = resolve_block_weights(bm, {"up_blocks.1.attentions.0": 1.0, "mid_block": 0.5})
    assert by_id == by_name
    prefix = resolve_block_weights(bm, {"up_blocks.1": 2.0})
    assert {layer for layer, w in prefix.items() if w == 2.0} == {("output", n, 0) for n in (3, 4, 5)}


def test_sdxl_per_transformer_depth_lists_set_each_layer(sdxl):
    bm = block_map(sdxl.model)
    depth = [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.0, 0.0]
    named = resolve_block_weights(bm, {"output 1": depth})
    nested = resolve_block_weights(bm, {"up": {"block_0": [0.0, depth, 0.0]}})
    assert named == nested
    assert [named[("output", 1, i)] for i in range(10)] == depth
    assert sum(1 for w in named.values() if w) == 6


def test_text_specs_are_read_as_json_or_python_literals(sd15):
    bm = block_map(sd15.model)
    as_json = block_weights_for(bm, CUSTOM, '{"up": {"block_1": [0.0, 1.0, 0.0]}}')
    as_python = block_weights_for(bm, CUSTOM, "{'up': {'block_1': [0.0, 1.0, 0.0]}}")
    assert as_json == as_python and as_json[("output", 4, 0)] == 1.0


@pytest.mark.parametrize("spec,message", [
    ({"output 12": 1.0}, "names no attention block"),
    ({"up": {"block_3": 1.0}}, "up_blocks with attention in this model are block_0, block_1"),
    ({"up": {"block_0": [1.0, 0.0]}}, "has 3 attentions, got 2 values"),
    ({"output 1": [1.0, 0.0, 1.0]}, "has 10 transformer layers, got 3 values"),
    ({"output 1": "strong"}, "expected a number"),
])
def test_specs_that_do_not_fit_the_model_say_why(sdxl, spec, message):
    with pytest.raises(BlockWeightsError, match=message):
        resolve_block_weights(block_map(sdxl.model), spec)


def test_unreadable_text_and_a_spec_beside_a_preset_are_refused(sd15):
    bm = block_map(sd15.model)
    with pytest.raises(BlockWeightsError, match="cannot read it"):
        parse_spec("{up: [}")
    with pytest.raises(BlockWeightsError, match="choose 'custom"):
        block_weights_for(bm, STYLE, '{"output 1": 1.0}')
    with pytest.raises(BlockWeightsError, match="needs a spec"):
        block_weights_for(bm, CUSTOM, "  ")
