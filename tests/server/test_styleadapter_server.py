"""StyleAdapter through a real server: a StyleAdapter checkpoint in the documented layout runs and
leaves the next plain prompt untouched; bad input names node and input, and the server keeps serving."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, SD15_CHECKPOINT, STYLE_ADAPTER_SD15
from stylekit.tests.support.server import PromptFailed

SEED = 61027  # used by no other test: the plain prompts are computed, never served from cache


def _plain(sampler: str = "KSampler") -> dict:
    common = dict(cfg=5.0, sampler_name="euler", scheduler="normal", model=["1", 0], positive=["2", 0],
                  negative=["3", 0], latent_image=["4", 0])
    if sampler == "KSampler":
        sample = {"class_type": "KSampler", "inputs": dict(common, seed=SEED, steps=3, denoise=1.0)}
    else:  # the same sampling through another node: recomputed, not served from the cache
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
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"StyleKit/test_styleadapter_{sampler}",
                                                    "images": ["6", 0]}},
    }


def _with_style_adapter(adapter: str, **settings) -> dict:
    prompt = _plain()
    prompt["10"] = {"class_type": "StyleKitIPAdapterLoader", "inputs": {"ipadapter_file": adapter}}
    prompt["11"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_VIT_H.filename}}
    prompt["12"] = {"class_type": "LoadImage", "inputs": {"image": "stylekit_style.png"}}
    prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "stylekit_style_2.png"}}
    prompt["14"] = {"class_type": "ImageBatch", "inputs": {"image1": ["12", 0], "image2": ["13", 0]}}
    inputs = dict(model=["1", 0], ipadapter=["10", 0], clip_vision=["11", 0], image=["14", 0], style_scale=1.0,
                  shuffle_grid=2, shuffle_seed=0, remove_class_token=True, merge="joint", start_percent=0.0,
                  end_percent=1.0, blocks="all blocks", block_weights="")
    prompt["15"] = {"class_type": "StyleKitStyleAdapter", "inputs": dict(inputs, **settings)}
    prompt["5"]["inputs"]["model"] = ["15", 0]
    prompt["7"]["inputs"]["filename_prefix"] = "StyleKit/test_styleadapter_patched"
    return prompt


def _pixels(server, outputs) -> np.ndarray:
    (ref,) = outputs.images()
    return np.asarray(Image.open(io.BytesIO(server.fetch(ref))).convert("RGB"))


def test_a_styleadapter_checkpoint_acts_and_the_next_plain_prompt_is_unchanged(server):
    plain = _pixels(server, server.run(_plain()))
    patched = _pixels(server, server.run(_with_style_adapter(STYLE_ADAPTER_SD15.filename)))
    after = _pixels(server, server.run(_plain("KSamplerAdvanced")))
    assert not np.array_equal(patched, plain)
    assert np.array_equal(after, plain)


def test_class_token_removal_with_a_base_adapter_names_node_and_input_and_the_server_keeps_serving(server):
    with pytest.raises(PromptFailed) as failed:
        server.run(_with_style_adapter("ip-adapter_sd15.safetensors"))
    message = str(failed.value)
    assert "StyleKit StyleAdapter: input 'remove_class_token'" in message and "set remove_class_token to false" in message
    assert server.alive()
    assert server.run(_plain()).images()


def test_the_loader_lists_the_styleadapter_checkpoint(object_info):
    files = object_info["StyleKitIPAdapterLoader"]["input"]["required"]["ipadapter_file"][1]["options"]
    assert STYLE_ADAPTER_SD15.filename in files
    assert "joint" in object_info["StyleKitStyleAdapter"]["input"]["required"]["merge"][1]["options"]
