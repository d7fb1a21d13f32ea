"""StyleKit's IP-Adapter and the incumbent IP-Adapter pack's protocol (a test-only pack,
tests/support/incumbent_protocol) on one model through a real server: both orders give the
same image, which is neither adapter's alone; on SD1.5 and on SDXL (64 px, 2 steps)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, SD15_CHECKPOINT, SDXL_CHECKPOINT

SEED = 61_331  # used by no other test
ADAPTER = {SD15_CHECKPOINT.filename: "ip-adapter_sd15.safetensors",
           SDXL_CHECKPOINT.filename: "ip-adapter_sdxl_vit-h.safetensors"}


def _prompt(ckpt: str, order: tuple[str, ...]) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "StyleKitIPAdapterLoader", "inputs": {"ipadapter_file": ADAPTER[ckpt]}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_VIT_H.filename}},
        "12": {"class_type": "LoadImage", "inputs": {"image": "stylekit_style.png"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "StyleKit/test_composition", "images": ["6", 0]}},
    }
    model = ["1", 0]
    for i, who in enumerate(order):
        node = f"2{i}"
        if who == "ours":
            prompt[node] = {"class_type": "StyleKitIPAdapter", "inputs": dict(
                model=model, ipadapter=["10", 0], clip_vision=["11", 0], image=["12", 0], weight=1.0,
                start_percent=0.0, end_percent=1.0, blocks="all blocks", block_weights="", combine="concat")}
        else:
            prompt[node] = {"class_type": "TestIncumbentIPAdapterProtocol", "inputs": {"model": model, "weight": 1.0,
                                                                                      "seed": 7}}
        model = [node, 0]
    prompt["5"] = {"class_type": "KSampler", "inputs": {
        "seed": SEED, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}}
    return prompt


def _pixels(server, prompt: dict) -> np.ndarray:
    (ref,) = server.run(prompt, timeout=900).images()
    return np.asarray(Image.open(io.BytesIO(server.fetch(ref))), dtype=np.int16)


@pytest.mark.parametrize("ckpt", [SD15_CHECKPOINT.filename, SDXL_CHECKPOINT.filename], ids=["sd15", "sdxl"])
def test_both_orders_apply_both_adapters(server, ckpt):
    ours = _pixels(server, _prompt(ckpt, ("ours",)))
    theirs = _pixels(server, _prompt(ckpt, ("theirs",)))
    ours_then_theirs = _pixels(server, _prompt(ckpt, ("ours", "theirs")))
    theirs_then_ours = _pixels(server, _prompt(ckpt, ("theirs", "ours")))
    assert np.abs(ours_then_theirs - theirs_then_ours).max() <= 2          # one sum, either order (8-bit rounding)
    assert np.abs(ours_then_theirs - ours).max() > 8                       # the incumbent acted...
    assert np.abs(ours_then_theirs - theirs).max() > 8                     # ... and so did StyleKit
