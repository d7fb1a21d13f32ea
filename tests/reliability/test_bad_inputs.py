"""A corpus of bad inputs through the server API. Each must end in a clear error that names the
node and the input at fault (in /prompt's node_errors or /history's execution_error), or, where
the input is unusual but valid, run; the server must keep serving after every one."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from stylekit.tests.fixtures.registry import SDXL_CHECKPOINT
from stylekit.tests.support.server import PromptFailed, PromptRejected, ServerError

from . import prompts as p
from .conftest import OUTCOMES, REFUSAL_SECONDS

ERROR, RUNS = "node error", "ran"
# A literal input (typed into the prompt, not linked) that core or the node's validate_inputs
# refuses is refused at /prompt before anything runs: within a second, the whole request.
LITERAL = 1.0


@dataclass
class Case:
    name: str
    build: Callable[[], dict]
    outcome: str = ERROR
    says: tuple[str, ...] = ()      # every one of these must appear in the error (node, input, cause)
    tags: list[str] = field(default_factory=list)
    seconds: float | None = None    # LITERAL: refused at /prompt, bounded in time; None: refused when it runs


def _ip(**kw):
    return lambda: p.with_ip_adapter(seed=1, **kw)


def _controls(class_type: str, **kw):
    """The IP-Adapter case on StyleKit IP-Adapter Advanced or Tiled, neutral controls unless given."""
    controls = dict(weight_type="linear", weight_composition=1.0, embeds_scaling="V only", skip_middle_block=False)
    controls.update({"unfold_batch": False, "frame_weights": ""} if class_type.endswith("Advanced") else {"sharpening": 0.0})
    image = kw.pop("image", "stylekit_style.png")

    def build():
        prompt = p.with_ip_adapter(seed=1, image=image)
        prompt["13"]["class_type"] = class_type
        prompt["13"]["inputs"].update(controls, **kw)
        return prompt
    return build


def _decoded_into(latent_file: str, build, node: str, input_name: str = "image"):
    """`build`'s prompt with a VAE-decoded latent file as `node`'s image input."""
    def inner():
        prompt = build()
        prompt["50"] = {"class_type": "LoadLatent", "inputs": {"latent": latent_file}}
        prompt["51"] = {"class_type": "VAEDecode", "inputs": {"samples": ["50", 0], "vae": ["1", 2]}}
        prompt[node]["inputs"][input_name] = ["51", 0]
        return prompt
    return inner


def _latent_image(latent_file: str, **ip):
    """A VAE-decoded latent file as the IP-Adapter's reference image."""
    return _decoded_into(latent_file, _ip(**ip), "13")


def _inversion_of(latent: list, extra: dict | None = None, **inputs):
    def build():
        prompt = p.txt2img(seed=1)
        prompt.update(extra or {})
        prompt.update(p.inversion_nodes(latent, **inputs))
        prompt["5"]["inputs"]["latent_image"] = ["40", 0]
        prompt["5"]["inputs"]["denoise"] = 1.0
        return prompt
    return build


def _loaded_latent(name: str) -> dict:
    return {"50": {"class_type": "LoadLatent", "inputs": {"latent": name}}}


def _image_latent(name: str) -> dict:
    return {"52": {"class_type": "LoadImage", "inputs": {"image": name}},
            "53": {"class_type": "VAEEncode", "inputs": {"pixels": ["52", 0], "vae": ["1", 2]}}}


def _mask_frames(frames: int, width: int = 64, height: int = 64):
    def build():
        prompt = p.with_ip_adapter(seed=1)
        prompt["60"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width, "height": height}}
        prompt["61"] = {"class_type": "MaskToImage", "inputs": {"mask": ["60", 0]}}
        prompt["62"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["61", 0], "amount": frames}}
        prompt["63"] = {"class_type": "ImageToMask", "inputs": {"image": ["62", 0], "channel": "red"}}
        prompt["13"]["inputs"]["attn_mask"] = ["63", 0]
        return prompt
    return build


def _without(build, node: str, input_name: str):
    def inner():
        prompt = build()
        del prompt[node]["inputs"][input_name]
        return prompt
    return inner


def _vsp_sampler(**inputs):
    def build():
        prompt = p.txt2img(seed=1, batch=2)
        prompt["30"] = {"class_type": "StyleKitVisualStylePromptingReferenceSampler", "inputs": dict(
            model=["1", 0], positive=["2", 0], negative=["3", 0], reference_positive=["2", 0],
            latent_image=["4", 0], seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
            color_calibration=False, calibration_start_percent=0.85, calibration_end_percent=0.9,
            blocks="highest-resolution up block", custom_blocks="", **inputs)}
        prompt["6"]["inputs"]["samples"] = ["30", 0]
        del prompt["5"]
        return prompt
    return build


def _uncropped(image: str):
    def build():
        prompt = p.patched(p.txt2img(seed=1), p.instantstyle_nodes(), ["15", 0])
        prompt["12"]["inputs"]["image"] = image
        prompt["14"]["inputs"]["crop"] = "none"
        return prompt
    return build


def _blora_on(ckpt: str, lora: str):
    def build():
        prompt = p.txt2img(seed=1)
        prompt["1"]["inputs"]["ckpt_name"] = ckpt
        prompt["70"] = {"class_type": "StyleKitLoadBLoRA", "inputs": {"lora_name": lora}}
        prompt["71"] = {"class_type": "StyleKitApplyBLoRA", "inputs": {
            "model": ["1", 0], "lora": ["70", 0], "content_strength": 1.0, "style_strength": 1.0}}
        prompt["5"]["inputs"]["model"] = ["71", 0]
        return prompt
    return build


def _prompt_batch(text: str):
    def build():
        prompt = p.txt2img(seed=1)
        prompt["80"] = {"class_type": "StyleKitPromptBatch", "inputs": {"clip": ["1", 1], "text": text}}
        prompt["5"]["inputs"]["positive"] = ["80", 0]
        return prompt
    return build


LOADER, IPA = "StyleKit IP-Adapter Loader", "StyleKit IP-Adapter"
CORPUS = [
    # Wrong or damaged model files.
    Case("ipadapter: truncated safetensors", _ip(adapter="stylekit_bad_truncated.safetensors"),
         says=(LOADER, "ipadapter_file")),
    Case("ipadapter: a text file named .safetensors", _ip(adapter="stylekit_bad_text.safetensors"),
         says=(LOADER, "ipadapter_file")),
    Case("ipadapter: random bytes named .bin", _ip(adapter="stylekit_bad_random.bin"),
         says=(LOADER, "ipadapter_file")),
    Case("ipadapter: a LoRA file", _ip(adapter="stylekit_bad_lora.safetensors"),
         says=(LOADER, "ipadapter_file", "not an IP-Adapter")),
    Case("ipadapter: file not in the folder", _ip(adapter="missing.safetensors"),
         says=("StyleKitIPAdapterLoader", "ipadapter_file"), seconds=LITERAL),
    Case("clip vision: truncated safetensors", _ip(clip_vision="stylekit_bad_truncated.safetensors"),
         says=("CLIPVisionLoader",)),
    Case("checkpoint: an IP-Adapter file as checkpoint",
         lambda: {**p.txt2img(1), "1": {"class_type": "CheckpointLoaderSimple",
                                        "inputs": {"ckpt_name": "stylekit_bad_ip_adapter_as_checkpoint.safetensors"}}},
         says=("CheckpointLoaderSimple",)),
    Case("b-lora: a text file as LoRA", _blora_on(SDXL_CHECKPOINT.filename, "stylekit_bad_text.safetensors"),
         says=("StyleKit Load B-LoRA", "lora_name")),
    # Mismatched models.
    Case("ipadapter: ViT-bigG adapter with the ViT-H CLIP vision",
         lambda: {**p.with_ip_adapter(seed=1, adapter="ip-adapter_sdxl.safetensors"),
                  "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CHECKPOINT.filename}}},
         says=(IPA, "clip_vision", "bigG")),
    Case("ipadapter: SDXL adapter on an SD1.5 model", _ip(adapter="ip-adapter_sdxl_vit-h.safetensors"),
         says=(IPA, "ipadapter", "SDXL")),
    # Masks.
    Case("attn_mask: 3 frames for 1 latent", _mask_frames(3), says=(IPA, "attn_mask", "3 frames")),
    Case("attn_mask: 4096x64 mask for a square latent", _mask_frames(1, 4096, 64),
         says=(IPA, "attn_mask", "aspect")),
    Case("attn_mask: 1x1 mask (a constant weight)", _mask_frames(1, 1, 1), outcome=RUNS),
    # Empty batches.
    Case("latent: a batch of 0 decoded (core's VAE Decode refuses it)", _latent_image("stylekit_empty.latent"),
         says=("VAEDecode",)),
    Case("latent: a batch of 0 into DDIM inversion", _inversion_of(["50", 0], _loaded_latent("stylekit_empty.latent")),
         says=("StyleKit DDIM Inversion", "latent_image", "empty")),
    Case("prompt batch: no prompt lines", _prompt_batch("\n  \n"), says=("StyleKit Prompt Batch", "text"),
         seconds=LITERAL),
    # Extreme sizes.
    Case("image: 1x1 reference", _ip(image="stylekit_1x1.png"), outcome=RUNS),
    Case("image: 4096x64 reference", _ip(image="stylekit_4096x64.png"), outcome=RUNS),
    Case("image: 4096x64 reference, encoded uncropped", _uncropped("stylekit_4096x64.png"), outcome=RUNS),
    Case("image: 1x1 content into DDIM inversion", _inversion_of(["53", 0], _image_latent("stylekit_1x1.png")),
         says=("VAEEncode",)),
    Case("advanced: frame weights that are not numbers", _controls("StyleKitIPAdapterAdvanced", frame_weights="1, x"),
         says=("StyleKit IP-Adapter Advanced", "frame_weights"), seconds=LITERAL),
    Case("advanced: more frame weights than latents, unfolded", _controls(
        "StyleKitIPAdapterAdvanced", frame_weights="1, 0.5, 0.2", unfold_batch=True, embeds_scaling="K+V"), outcome=RUNS),
    Case("tiled: 4096x64 reference on a square latent", _controls("StyleKitIPAdapterTiled", image="stylekit_4096x64.png",
                                                                   sharpening=1.0), outcome=RUNS),
    # Non-finite values.
    Case("image: NaN reference", _latent_image("stylekit_nan.latent"), says=(IPA, "image", "NaN")),
    Case("latent: inf into DDIM inversion", _inversion_of(["50", 0], _loaded_latent("stylekit_inf.latent")),
         says=("StyleKit DDIM Inversion", "latent_image", "inf")),
    Case("latent: NaN into DDIM inversion", _inversion_of(["50", 0], _loaded_latent("stylekit_nan.latent")),
         says=("StyleKit DDIM Inversion", "latent_image", "NaN")),
    # Missing references.
    Case("ipadapter: no image connected", _without(_ip(), "13", "image"), says=("StyleKitIPAdapter", "image")),
    Case("vsp sampler: neither reference_latent nor trajectory", _vsp_sampler(),
         says=("StyleKit Visual Style Prompting", "reference_latent")),
    # Invalid block strings.
    Case("block_weights: unreadable dict", _ip(blocks="custom (block_weights)", block_weights="{'down': {'block_2': [0.0,"),
         says=(IPA, "block_weights"), seconds=LITERAL),
    Case("block_weights: a block the model lacks", _ip(blocks="custom (block_weights)", block_weights='{"output 42": 1.0}'),
         says=(IPA, "block_weights", "output 42")),
    Case("block_weights: weights without the custom preset", _ip(block_weights='{"output 1": 1.0}'),
         says=(IPA, "block")),
    Case("style aligned: custom block that does not exist",
         lambda: p.with_style_aligned(seed=1, blocks="custom", custom_blocks="output 42"),
         says=("StyleKit StyleAligned", "custom_blocks", "output 42")),
    Case("vsp: custom preset with no blocks", lambda: p.with_vsp(seed=1, blocks="custom", custom_blocks=""),
         says=("StyleKit Visual Style Prompting", "custom_blocks")),
    # StyleAdapter strategies on adapters they do not fit.
    Case("styleadapter: class-token removal on a base adapter",
         lambda: p.with_style_adapter(seed=1, adapter="ip-adapter_sd15.safetensors", merge="concat"),
         says=("StyleKit StyleAdapter", "remove_class_token")),
    Case("styleadapter: joint merge on a base adapter",
         lambda: p.with_style_adapter(seed=1, adapter="ip-adapter_sd15.safetensors", remove_class_token=False),
         says=("StyleKit StyleAdapter", "merge")),
    Case("styleadapter: NaN reference", _decoded_into("stylekit_nan.latent", lambda: p.with_style_adapter(seed=1), "16"),
         says=("StyleKit StyleAdapter", "image", "NaN")),
    Case("styleadapter: shuffle grid 0", lambda: p.with_style_adapter(seed=1, shuffle_grid=0),
         says=("StyleKitStyleAdapter", "shuffle_grid"), seconds=LITERAL),
    # Style guidance.
    Case("style discriminator: truncated checkpoint.pth",
         lambda: p.with_style_guidance(seed=1, discriminator="stylekit_bad_truncated.pth"),
         says=("StyleKit Style Discriminator Loader", "discriminator_file")),
    Case("style discriminator: a CLIP vision file instead of CSD",
         lambda: p.with_style_guidance(seed=1, discriminator="stylekit_bad_clip_vision.safetensors"),
         says=("StyleKit Style Discriminator Loader", "discriminator_file")),
    Case("style guidance: NaN style image", _decoded_into("stylekit_nan.latent", lambda: p.with_style_guidance(seed=1), "92",
                                                     "style_image"),
         says=("StyleKit Style Guidance", "style_image", "NaN")),
    Case("style guidance: negative scale", lambda: p.with_style_guidance(seed=1, scale=-10.0),
         says=("StyleKitStyleGuidance", "scale"), seconds=LITERAL),
    # Out-of-range numbers.
    Case("ipadapter: weight -5", _ip(weight=-5.0), says=("StyleKitIPAdapter", "weight"), seconds=LITERAL),
    Case("ipadapter: a block weight of -50", _ip(blocks="custom (block_weights)", block_weights='{"output 4": -50}'),
         says=(IPA, "block_weights", "-50")),
    Case("ipadapter: start after end", _ip(start_percent=0.8, end_percent=0.2), says=(IPA, "end_percent"),
         seconds=LITERAL),
    Case("style aligned: shared_score_scale -1", lambda: p.with_style_aligned(seed=1, shared_score_scale=-1.0),
         says=("StyleKitStyleAligned", "shared_score_scale"), seconds=LITERAL),
    Case("ipadapter: unknown block preset", _ip(blocks="every other block"), says=("StyleKitIPAdapter", "blocks"),
         seconds=LITERAL),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_bad_input_gives_a_clear_node_error_and_the_server_keeps_serving(server, bad_files, case):
    prompt = case.build()
    started = time.monotonic()
    try:
        server.run(prompt, timeout=300)
        outcome, message = RUNS, ""
    except (PromptRejected, PromptFailed) as err:
        outcome, message = ERROR, str(err)
    except ServerError as err:
        outcome, message = "crash", str(err)
    elapsed = time.monotonic() - started
    OUTCOMES.append((case.name, outcome, message))
    assert server.alive(), f"the server died on {case.name}:\n{server.log_tail()}"
    assert server.get("/system_stats")["system"]  # still answering
    assert outcome == case.outcome, message or "the prompt ran"
    missing = [s for s in case.says if s not in message]
    assert not missing, f"the error does not say {missing}: {message}"
    if case.seconds is not None:
        REFUSAL_SECONDS.append((case.name, elapsed))
        assert elapsed < case.seconds, f"refused after {elapsed:.2f} s"
