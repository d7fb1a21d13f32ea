"""Small API-format graphs the reliability suite builds its cases from: a tiny SD1.5 txt2img and
the pieces each StyleKit method adds to it. Node ids are fixed so that two prompts differing in
one node reuse the executor's cache for the rest (the leak checks rely on it)."""
from __future__ import annotations

import copy

from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, SD15_CHECKPOINT

SIDE = 64      # 8x8 latent
STEPS = 2


def txt2img(seed: int, batch: int = 1, prefix: str = "StyleKit/reliability") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CHECKPOINT.filename}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}},
    }


def patched(prompt: dict, nodes: dict, model_output: list) -> dict:
    """`prompt` with extra `nodes` and the sampler's model taken from `model_output`."""
    out = copy.deepcopy(prompt)
    out.update(copy.deepcopy(nodes))
    out["5"]["inputs"]["model"] = model_output
    return out


def ip_adapter_nodes(adapter: str = "ip-adapter_sd15.safetensors", image: str = "stylekit_style.png",
                     clip_vision: str = CLIP_VISION_VIT_H.filename, **inputs) -> dict:
    settings = dict(model=["1", 0], ipadapter=["10", 0], clip_vision=["11", 0], image=["12", 0], weight=1.0,
                    start_percent=0.0, end_percent=1.0, blocks="all blocks", block_weights="", combine="concat")
    settings.update(inputs)
    return {
        "10": {"class_type": "StyleKitIPAdapterLoader", "inputs": {"ipadapter_file": adapter}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "12": {"class_type": "LoadImage", "inputs": {"image": image}},
        "13": {"class_type": "StyleKitIPAdapter", "inputs": settings},
    }


def with_ip_adapter(seed: int, **kwargs) -> dict:
    return patched(txt2img(seed), ip_adapter_nodes(**kwargs), ["13", 0])


def style_aligned_nodes(**inputs) -> dict:
    settings = dict(model=["1", 0], share_group_norm=True, adain_queries=True, adain_keys=True, adain_values=False,
                    shared_score_scale=1.0, shared_score_shift=0.0, blocks="all", custom_blocks="",
                    only_self_level=0.0, start_percent=0.0, end_percent=1.0)
    settings.update(inputs)
    return {"20": {"class_type": "StyleKitStyleAligned", "inputs": settings}}


def with_style_aligned(seed: int, batch: int = 2, **inputs) -> dict:
    return patched(txt2img(seed, batch), style_aligned_nodes(**inputs), ["20", 0])


def vsp_nodes(**inputs) -> dict:
    settings = dict(model=["1", 0], blocks="highest-resolution up block", custom_blocks="", start_percent=0.0,
                    end_percent=1.0, first_steps_cfg=0.0, first_steps=3)
    settings.update(inputs)
    return {"30": {"class_type": "StyleKitVisualStylePrompting", "inputs": settings}}


def with_vsp(seed: int, batch: int = 2, **inputs) -> dict:
    return patched(txt2img(seed, batch), vsp_nodes(**inputs), ["30", 0])


def instantstyle_nodes() -> dict:
    """Encode -> content subtraction -> apply embeds on InstantStyle's style blocks."""
    return {
        "10": {"class_type": "StyleKitIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_VIT_H.filename}},
        "12": {"class_type": "LoadImage", "inputs": {"image": "stylekit_style.png"}},
        "14": {"class_type": "StyleKitIPAdapterEncode", "inputs": {
            "ipadapter": ["10", 0], "clip_vision": ["11", 0], "image": ["12", 0], "crop": "center"}},
        "15": {"class_type": "StyleKitIPAdapterApplyEmbeds", "inputs": {
            "model": ["1", 0], "ipadapter": ["10", 0], "embeds": ["14", 0], "weight": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "blocks": "InstantStyle style", "block_weights": "", "combine": "concat"}},
    }


def inversion_nodes(latent: list, **inputs) -> dict:
    settings = dict(model=["1", 0], positive=["2", 0], negative=["3", 0], latent_image=latent, steps=STEPS, cfg=1.0,
                    scheduler="ddim_uniform", fixed_point_iterations=0)
    settings.update(inputs)
    return {"40": {"class_type": "StyleKitDDIMInversion", "inputs": settings}}


def style_adapter_nodes(adapter: str = "ip-adapter-plus_sd15.safetensors", image: str = "stylekit_style.png",
                        **inputs) -> dict:
    settings = dict(model=["1", 0], ipadapter=["10", 0], clip_vision=["11", 0], image=["12", 0], style_scale=0.8,
                    shuffle_grid=2, shuffle_seed=0, remove_class_token=True, merge="joint", start_percent=0.0,
                    end_percent=1.0, blocks="all blocks", block_weights="")
    settings.update(inputs)
    nodes = ip_adapter_nodes(adapter=adapter, image=image)
    del nodes["13"]
    nodes["16"] = {"class_type": "StyleKitStyleAdapter", "inputs": settings}
    return nodes


def with_style_adapter(seed: int, **kwargs) -> dict:
    return patched(txt2img(seed), style_adapter_nodes(**kwargs), ["16", 0])


def style_guidance_nodes(discriminator: str = "checkpoint.pth", image: str = "stylekit_style.png", **inputs) -> dict:
    settings = dict(model=["1", 0], style_discriminator=["90", 0], style_image=["91", 0], scale=2000.0, every=1,
                    start_percent=0.0, end_percent=1.0, mode="fast", decoder="taesd (approximate)")
    settings.update(inputs)
    return {
        "90": {"class_type": "StyleKitStyleDiscriminatorLoader", "inputs": {"discriminator_file": discriminator}},
        "91": {"class_type": "LoadImage", "inputs": {"image": image}},
        "92": {"class_type": "StyleKitStyleGuidance", "inputs": settings},
    }


def with_style_guidance(seed: int, **kwargs) -> dict:
    return patched(txt2img(seed), style_guidance_nodes(**kwargs), ["92", 0])
