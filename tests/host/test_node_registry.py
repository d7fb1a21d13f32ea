"""Every node of the pack follows the house conventions; the block map node runs on a real model."""
from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def pack_nodes(comfy_host):
    import stylekit

    extension = asyncio.run(stylekit.comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


def test_every_node_id_starts_with_stylekit_and_lives_under_the_stylekit_category(pack_nodes):
    assert pack_nodes
    for node in pack_nodes:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("StyleKit"), schema.node_id
        assert schema.category.startswith("StyleKit/"), (schema.node_id, schema.category)
        assert schema.display_name and schema.description, schema.node_id


def test_display_names_come_from_the_one_table(pack_nodes):
    from stylekit.nodes._common import DISPLAY_NAMES

    shown = {n.GET_SCHEMA().node_id: n.GET_SCHEMA().display_name for n in pack_nodes}
    assert shown == DISPLAY_NAMES


def test_node_ids_are_unique(pack_nodes):
    ids = [n.GET_SCHEMA().node_id for n in pack_nodes]
    assert len(ids) == len(set(ids))


def test_block_map_node_reports_the_middle_block_of_a_real_model(sd15):
    from stylekit.nodes.block_map import StyleKitBlockMap

    out = StyleKitBlockMap.execute(sd15.model)
    table = out.result[0]
    assert "mid_block.attentions.0" in table and "middle 0" in table
    assert table.splitlines()[-1] == "16 transformers, 16 attention layers"
