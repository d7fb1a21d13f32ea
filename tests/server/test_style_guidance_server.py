"""Through a real server: style guidance at scale 0 gives the plain images byte for byte, guided
sampling changes them and leaves nothing behind for the next plain prompt, and a bad setting comes
back naming the node and the input."""
from __future__ import annotations

import pytest

from stylekit.tests.fixtures.registry import CSD_CHECKPOINT
from stylekit.tests.server.test_shared_attention_server import cached_nodes, pixels, plain_prompt
from stylekit.tests.support.server import PromptFailed


def with_guidance(prefix: str, scale: float, decoder: str = "taesd (approximate)") -> dict:
    prompt = plain_prompt(prefix)
    prompt["8"] = {"class_type": "StyleKitStyleDiscriminatorLoader", "inputs": {"discriminator_file": CSD_CHECKPOINT.filename}}
    prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": "stylekit_style.png"}}
    prompt["10"] = {"class_type": "StyleKitStyleGuidance", "inputs": {
        "model": ["1", 0], "style_discriminator": ["8", 0], "style_image": ["9", 0], "scale": scale, "every": 1,
        "start_percent": 0.0, "end_percent": 1.0, "mode": "fast", "decoder": decoder}}
    prompt["5"]["inputs"]["model"] = ["10", 0]
    return prompt


def test_scale_zero_is_byte_identical_to_plain_and_guidance_leaves_nothing_behind(server):
    before = server.run(plain_prompt("sg_plain_before"))
    off = server.run(with_guidance("sg_off", 0.0))
    assert pixels(server, off) == pixels(server, before)
    guided = server.run(with_guidance("sg_on", 2000.0))
    assert pixels(server, guided) != pixels(server, before)
    after_id = server.queue(plain_prompt("sg_plain_after"))
    after = server.wait(after_id)
    assert "5" not in cached_nodes(server, after_id)
    assert pixels(server, after) == pixels(server, before)


def test_the_vae_decoder_without_a_vae_names_the_node_and_input(server):
    with pytest.raises(PromptFailed) as failed:
        server.run(with_guidance("sg_bad", 100.0, decoder="vae"))
    assert "StyleKit Style Guidance: input 'vae'" in str(failed.value)
    assert server.alive()
