"""IP-Adapter cost against plain sampling: one base adapter (goal: per-step time ratio <= 1.03 at
SD1.5 size), a plus adapter, two stacked adapters, and the memory of 10 chained patched clones
(goal < 1 % of the model's weights).

The reference image is encoded once (CLIP ViT-H, core's CLIPVisionLoader) and its tokens are
reused by every clone: the bench measures the patched UNet, not the encoder.
"""
from __future__ import annotations

from functools import lru_cache

from stylekit.ip_adapter.encode import encode_images, image_tokens
from stylekit.ip_adapter.files import load_ip_adapter
from stylekit.patching.ip_adapter import IPAdapterSettings, apply_ip_adapter
from stylekit.tests.fixtures.images import style_image
from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H
from stylekit.tests.support.host import load_clip_vision

from .harness import Case

BASE, PLUS = "ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"
SDXL_BASE = "ip-adapter_sdxl_vit-h.safetensors"


@lru_cache(maxsize=None)
def _prepared(filename: str):
    import numpy as np
    import torch

    adapter = load_ip_adapter(filename)
    image = torch.from_numpy(np.asarray(style_image(), dtype=np.float32) / 255.0)[None]
    with torch.inference_mode():
        embeds = encode_images(load_clip_vision(CLIP_VISION_VIT_H.filename), image, adapter.clip_input)
        return adapter, image_tokens(adapter, embeds)


def _with(*filenames: str):
    def patch(model, clip, vae):
        for filename in filenames:
            adapter, tokens = _prepared(filename)
            model = apply_ip_adapter(model, adapter, tokens, IPAdapterSettings(weight=0.8))
        return model
    return patch


CASES = [
    Case("IP-Adapter base", "sd15", _with(BASE), goal=1.03, memory_clones=10,
         notes="ip-adapter_sd15, every cross-attention layer, weight 0.8"),
    Case("IP-Adapter plus", "sd15", _with(PLUS), notes="ip-adapter-plus_sd15, 16 tokens"),
    Case("IP-Adapter base + plus stacked", "sd15", _with(BASE, PLUS), notes="two adapters on every layer"),
    Case("IP-Adapter base", "sdxl", _with(SDXL_BASE), side=1024, steps=1, memory_clones=10,
         notes="ip-adapter_sdxl_vit-h, every cross-attention layer"),
]
