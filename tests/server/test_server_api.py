"""The pack inside a real ComfyUI server, driven through the HTTP API as services drive it."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from stylekit.tests.fixtures.registry import SD15_CHECKPOINT, SDXL_CHECKPOINT
from stylekit.tests.support.server import PromptRejected


def txt2img(ckpt: str, seed: int = 1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "StyleKit/test_txt2img", "images": ["6", 0]}},
    }


def test_pack_nodes_appear_in_object_info_under_the_stylekit_category(object_info):
    ours = {k: v for k, v in object_info.items() if k.startswith("StyleKit")}
    assert "StyleKitBlockMap" in ours
    assert all(v["category"].startswith("StyleKit/") for v in ours.values())
    assert all(v["python_module"] == "custom_nodes.comfyui-stylekit" for v in ours.values())


@pytest.mark.parametrize("ckpt", [SD15_CHECKPOINT.filename, SDXL_CHECKPOINT.filename])
def test_txt2img_through_core_nodes_writes_a_png(server, ckpt):
    outputs = server.run(txt2img(ckpt))
    images = outputs.images()
    assert len(images) == 1 and images[0]["subfolder"] == "StyleKit"
    png = server.fetch(images[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_block_map_node_returns_its_table_through_the_api(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT.filename}},
        "2": {"class_type": "StyleKitBlockMap", "inputs": {"model": ["1", 0]}},
    }
    (table,) = server.run(prompt).texts()
    assert "up_blocks.0.attentions.1" in table and table.endswith("11 transformers, 70 attention layers")


def test_a_rejected_prompt_names_the_node_and_the_server_keeps_serving(server):
    bad = txt2img("no_such_model.safetensors")
    with pytest.raises(PromptRejected) as rejected:
        server.queue(bad)
    assert "CheckpointLoaderSimple (node 1)" in str(rejected.value)
    assert "no_such_model.safetensors" in str(rejected.value)
    assert server.alive()
    assert server.run(txt2img(SD15_CHECKPOINT.filename, seed=2)).images()
