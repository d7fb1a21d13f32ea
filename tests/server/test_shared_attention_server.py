"""Through a real server: StyleAligned and VSP leave nothing behind for the next prompt, and their
errors come back naming the node while the server keeps serving."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from stylekit.tests.fixtures.registry import SD15_CHECKPOINT
from stylekit.tests.support.server import PromptFailed


def plain_prompt(prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CHECKPOINT.filename}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "5": {"class_type": "KSampler", "inputs": {"seed": 4, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"StyleKit/{prefix}", "images": ["6", 0]}},
    }


def with_style_aligned(prefix: str) -> dict:
    prompt = plain_prompt(prefix)
    prompt["8"] = {"class_type": "StyleKitStyleAligned", "inputs": {
        "model": ["1", 0], "share_group_norm": True, "adain_queries": True, "adain_keys": True, "adain_values": False,
        "shared_score_scale": 1.0, "shared_score_shift": 0.6931, "blocks": "all", "custom_blocks": "",
        "only_self_level": 0.0, "start_percent": 0.0, "end_percent": 1.0}}
    prompt["5"]["inputs"]["model"] = ["8", 0]
    return prompt


def with_vsp_reference_sampler(prefix: str) -> dict:
    prompt = plain_prompt(prefix)
    prompt["8"] = {"class_type": "StyleKitVisualStylePromptingReferenceSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "reference_positive": ["2", 0],
        "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
        "scheduler": "normal", "color_calibration": True, "calibration_start_percent": 0.0,
        "calibration_end_percent": 1.0, "blocks": "all", "custom_blocks": "", "reference_latent": ["9", 0]}}
    prompt["9"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["6"]["inputs"]["samples"] = ["8", 0]
    del prompt["5"]
    return prompt


def pixels(server, outputs) -> list[bytes]:
    return [Image.open(io.BytesIO(server.fetch(ref))).tobytes() for ref in outputs.images()]


def cached_nodes(server, prompt_id: str) -> set[str]:
    status = server.get(f"/history/{prompt_id}")[prompt_id]["status"]
    return {n for kind, data in status.get("messages", []) if kind == "execution_cached" for n in data["nodes"]}


@pytest.mark.parametrize("shared", [with_style_aligned, with_vsp_reference_sampler])
def test_the_next_plain_prompt_is_byte_identical_to_one_run_before(server, shared):
    before = server.run(plain_prompt("plain_before"))
    during = server.run(shared("shared"))
    assert pixels(server, during) != pixels(server, before)
    after_id = server.queue(plain_prompt("plain_after"))
    after = server.wait(after_id)
    assert "5" not in cached_nodes(server, after_id)  # the plain KSampler really ran again
    assert pixels(server, after) == pixels(server, before)


def test_a_failing_shared_attention_node_names_itself_and_the_server_keeps_serving(server):
    bad = with_style_aligned("bad")
    bad["8"]["inputs"].update(blocks="custom", custom_blocks="output 42")
    with pytest.raises(PromptFailed) as failed:
        server.run(bad)
    assert "StyleKit StyleAligned: input 'custom_blocks': 'output 42'" in str(failed.value)
    assert server.alive() and server.run(plain_prompt("still_serving")).images()
