"""Flux and SD3.5 graphs in a real server, on the DiT fixtures: the tiny profile replaces the Flux
text encoder (T5-XXL cannot be tiny) with tensor conditioning, and the Block Map shows DiT sites."""
from __future__ import annotations

from stylekit.tests.fixtures.registry import FLUX_DEV
from stylekit.tests.support.workflows import tiny


def flux_txt2img() -> dict:
    """A user's Flux.1 dev graph as core's examples build it (decoding left out: the Flux workflows decode)."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_DEV.filename, "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                        "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a lighthouse",
                                                            "t5xxl": "a lighthouse at dusk", "guidance": 3.5}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "StyleKit/test_flux"}},
        "8": {"class_type": "StyleKitBlockMap", "inputs": {"model": ["1", 0]}},
    }


def test_a_flux_graph_runs_on_the_fixture_with_tensor_prompts_and_maps_its_dit_blocks(server):
    prompt = tiny(flux_txt2img())
    assert prompt["3"]["class_type"] == "TestDiTConditioning" and "2" not in prompt
    outputs = server.run(prompt)
    table = "\n".join(outputs.texts())
    assert "('double_block', 0)" in table and "single_transformer_blocks.0" in table and "text then image" in table
    assert any(out.get("latents") for out in outputs.by_node.values())
