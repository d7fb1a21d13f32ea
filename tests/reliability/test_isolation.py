"""Patch isolation through the server: after each patched prompt, the same plain prompt gives a
PNG byte-identical to one from a model no patch has seen (same loader output, recomputed)."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from . import prompts as p

SEED = 70411   # used by no other test: the plain prompt is computed, never served from another test's cache

PATCHED = {
    "IP-Adapter": lambda plain: p.patched(plain, p.ip_adapter_nodes(), ["13", 0]),
    "IP-Adapter, attention mask": lambda plain: p.patched(plain, {
        **p.ip_adapter_nodes(), "60": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}},
        "13": {**p.ip_adapter_nodes()["13"], "inputs": {**p.ip_adapter_nodes()["13"]["inputs"], "attn_mask": ["60", 0]}}},
        ["13", 0]),
    "InstantStyle encode + apply embeds": lambda plain: p.patched(plain, p.instantstyle_nodes(), ["15", 0]),
    "StyleAligned": lambda plain: p.patched(plain, p.style_aligned_nodes(), ["20", 0]),
    "Visual Style Prompting (+ first-steps cfg)": lambda plain: p.patched(
        plain, p.vsp_nodes(first_steps_cfg=20.0, first_steps=1), ["30", 0]),
    "StyleAdapter (shuffle, no class token, joint)": lambda plain: p.patched(
        plain, p.style_adapter_nodes(), ["16", 0]),
    "Style guidance (fast, TAESD, every step)": lambda plain: p.patched(plain, p.style_guidance_nodes(), ["92", 0]),
    "IP-Adapter Tiled (ease in, K+V, sharpened)": lambda plain: p.patched(plain, {
        **p.ip_adapter_nodes(), "13": {"class_type": "StyleKitIPAdapterTiled", "inputs": {
            **p.ip_adapter_nodes()["13"]["inputs"], "weight_type": "ease in", "weight_composition": 1.0,
            "embeds_scaling": "K+V", "skip_middle_block": False, "sharpening": 0.5}}}, ["13", 0]),
    "IP-Adapter then StyleAligned (stacked)": lambda plain: p.patched(
        plain, {**p.ip_adapter_nodes(), **p.style_aligned_nodes(model=["13", 0])}, ["20", 0]),
}


def _png(server, prompt: dict) -> tuple[list[bytes], list[str]]:
    """The saved PNG files of a prompt (bytes, metadata included) and the node ids served from cache."""
    prompt_id = server.queue(prompt)
    outputs = server.wait(prompt_id)
    history = server.get(f"/history/{prompt_id}")[prompt_id]
    cached = [node for kind, data in history["status"]["messages"] if kind == "execution_cached"
              for node in data.get("nodes", [])]
    return [server.fetch(ref) for ref in outputs.images()], cached


def _pixels(pngs: list[bytes]) -> list[bytes]:
    return [Image.open(io.BytesIO(png)).convert("RGB").tobytes() for png in pngs]


@pytest.fixture(scope="module")
def never_patched(server):
    server.post("/free", {"unload_models": True, "free_memory": True})
    server.run({"1": {"class_type": "LoadImage", "inputs": {"image": "stylekit_content.png"}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})  # carries the /free
    png, _ = _png(server, p.txt2img(SEED, batch=2, prefix="StyleKit/reliability_plain"))
    return png


@pytest.mark.parametrize("method", list(PATCHED))
def test_a_plain_prompt_after_a_patched_one_is_byte_identical_to_a_never_patched_run(server, never_patched, method):
    plain = p.txt2img(SEED, batch=2, prefix="StyleKit/reliability_plain")
    patched_png, _ = _png(server, PATCHED[method](plain))
    after, cached = _png(server, plain)
    assert "5" not in cached, "the sampler was served from cache: the check would prove nothing"
    assert "1" in cached, "the checkpoint was reloaded: the patched prompt's model was not the one reused"
    assert _pixels(patched_png) != _pixels(never_patched), f"{method} did not change the image: it proves nothing here"
    assert after == never_patched
