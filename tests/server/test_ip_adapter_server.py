"""IP-Adapter through a real server: nothing leaks into the next prompt, errors name node and input."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, SD15_CHECKPOINT, SDXL_CHECKPOINT
from stylekit.tests.support.server import PromptFailed

SEED = 90317  # used by no other test: the plain prompts below are computed, never served from cache


def _plain(sampler: str) -> dict:
    """SD1.5 txt2img; `sampler` KSampler or the equivalent KSamplerAdvanced (same seed, steps, sigmas)."""
    common = dict(cfg=5.0, sampler_name="euler", scheduler="normal", model=["1", 0], positive=["2", 0],
                  negative=["3", 0], latent_image=["4", 0])
    if sampler == "KSampler":
        sample = {"class_type": "KSampler", "inputs": dict(common, seed=SEED, steps=3, denoise=1.0)}
    else:
        sample = {"class_type": "KSamplerAdvanced", "inputs": dict(
            common, add_noise="enable", noise_seed=SEED, steps=3, start_at_step=0, end_at_step=10000,
            return_with_leftover_noise="disable")}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CHECKPOINT.filename}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": sample,
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"StyleKit/test_leak_{sampler}", "images": ["6", 0]}},
    }


def _with_ip_adapter(prompt: dict, adapter: str, ckpt: str = SD15_CHECKPOINT.filename, **settings) -> dict:
    prompt = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    prompt["1"]["inputs"]["ckpt_name"] = ckpt
    prompt["10"] = {"class_type": "StyleKitIPAdapterLoader", "inputs": {"ipadapter_file": adapter}}
    prompt["11"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_VIT_H.filename}}
    prompt["12"] = {"class_type": "LoadImage", "inputs": {"image": "stylekit_style.png"}}
    prompt["13"] = {"class_type": "StyleKitIPAdapter", "inputs": dict(
        model=["1", 0], ipadapter=["10", 0], clip_vision=["11", 0], image=["12", 0], weight=1.0, start_percent=0.0,
        end_percent=1.0, blocks="all blocks", block_weights="", combine="concat", **settings)}
    prompt["5"]["inputs"]["model"] = ["13", 0]
    prompt["7"]["inputs"]["filename_prefix"] = "StyleKit/test_leak_ip_adapter"
    return prompt


def _pixels(server, outputs) -> np.ndarray:
    (ref,) = outputs.images()
    return np.asarray(Image.open(io.BytesIO(server.fetch(ref))).convert("RGB"))


def _fresh_executor(server) -> None:
    """Drop every cached node output and model, so the next prompt loads the checkpoint anew.

    The server applies /free after the prompt it is running, so a cheap prompt carries it."""
    server.post("/free", {"unload_models": True, "free_memory": True})
    server.run({"1": {"class_type": "LoadImage", "inputs": {"image": "stylekit_content.png"}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})


def test_the_patched_model_leaves_the_next_plain_prompt_byte_identical(server):
    _fresh_executor(server)
    never_patched = _pixels(server, server.run(_plain("KSampler")))            # a model no patch has seen
    patched = _pixels(server, server.run(_with_ip_adapter(_plain("KSampler"), "ip-adapter_sd15.safetensors")))
    after = _pixels(server, server.run(_plain("KSamplerAdvanced")))          # same loader output, recomputed
    assert np.array_equal(after, never_patched)
    assert not np.array_equal(patched, never_patched)  # the adapter did act in between


def test_a_mismatched_clip_vision_fails_the_prompt_naming_node_and_input_and_the_server_keeps_serving(server):
    bad = _with_ip_adapter(_plain("KSampler"), "ip-adapter_sdxl.safetensors", ckpt=SDXL_CHECKPOINT.filename)
    with pytest.raises(PromptFailed) as failed:
        server.run(bad)
    message = str(failed.value)
    assert "StyleKit IP-Adapter: input 'clip_vision'" in message and "CLIP-ViT-bigG-14" in message
    assert server.alive()
    assert server.run(_plain("KSampler")).images()


def test_ip_adapter_nodes_list_the_files_of_models_ipadapter(object_info):
    files = object_info["StyleKitIPAdapterLoader"]["input"]["required"]["ipadapter_file"][1]["options"]
    assert {"ip-adapter_sd15.safetensors", "ip-adapter_sd15_light_v11.bin", "ip-adapter_sdxl.safetensors"} <= set(files)
    assert object_info["StyleKitIPAdapter"]["output"] == ["MODEL"]
    assert object_info["StyleKitIPAdapterEncode"]["output"] == ["STYLEKIT_IMAGE_EMBEDS"]
