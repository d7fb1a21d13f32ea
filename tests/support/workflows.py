"""The example workflows in API format, and the 'tiny' profile that runs them on the fixtures.

Workflows are authored with the settings a user would run on real models (SDXL at 1024 px, 30
steps). On the tiny random-weight fixtures only the plumbing matters, so `tiny()` shrinks what
costs CPU time and nothing else: image sizes to at most TINY_SIDE px and step counts to at most
TINY_STEPS, with step indices (`*_at_step`, `*_steps` offsets) scaled by the same factor so their
relations hold. Flux and SD3 prompts come from tensors: core's Flux text encoder always builds
T5-XXL (DESIGN §6), so every text encode fed by a Flux or SD3 text-encoder loader becomes the test
server's TestDiTConditioning on the graph's diffusion model, and the loader goes. SD3 could run on
CLIP-L + CLIP-G alone (a setup core supports), but the full-size CLIP-G costs ~30 s and 4 GB per
workflow on CPU (measured) and exercises only core's text path, which no StyleKit node touches.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .paths import REPO

WORKFLOWS = REPO / "workflows"
API_DIR = WORKFLOWS / "api"
TINY_SIDE = 64
TINY_STEPS = 4


# A workflow that loads a file another workflow writes, and that writer: run_order() puts the
# writer first (dreambooth_generate loads the LoRA dreambooth_train saves under models/loras).
RUNS_AFTER = {"dreambooth_generate": "dreambooth_train"}


def api_workflow_names() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def run_order(names: list[str]) -> list[str]:
    """`names` in name order, except that each workflow of RUNS_AFTER runs after its writer."""
    ordered = [n for n in sorted(names) if n not in RUNS_AFTER]
    for reader, writer in RUNS_AFTER.items():
        if reader in names:
            ordered.insert(ordered.index(writer) + 1 if writer in ordered else len(ordered), reader)
    return ordered


def load_api_workflow(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def _literal_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


TEXT_ENCODES = ("CLIPTextEncode", "CLIPTextEncodeFlux", "CLIPTextEncodeSD3")
# Where a DiT graph's model comes from: UNETLoader (diffusion_models/) or the SD3.5 single file.
MODEL_LOADERS = ("UNETLoader", "CheckpointLoaderSimple")


def _is_dit_text_encoder(node: dict) -> bool:
    """A Flux or SD3 text-encoder loader: these build T5-XXL (or CLIP-G, see the module docstring)."""
    if node.get("class_type") == "TripleCLIPLoader":  # SD3 only
        return True
    return (node.get("class_type") in ("DualCLIPLoader", "CLIPLoader")
            and node.get("inputs", {}).get("type") in ("flux", "sd3"))


def without_t5(prompt: dict) -> dict:
    """A copy of an API prompt whose Flux and SD3 text encodes are TestDiTConditioning nodes (module docstring)."""
    out = copy.deepcopy(prompt)
    loaders = {nid for nid, node in out.items() if _is_dit_text_encoder(node)}
    if not loaders:
        return out
    models = [nid for nid, node in out.items() if node.get("class_type") in MODEL_LOADERS]
    if len(models) != 1:
        raise ValueError(f"a Flux or SD3 workflow needs exactly one model loader ({' or '.join(MODEL_LOADERS)}) "
                         f"for its tensor prompts, found {len(models)}")
    for seed, (nid, node) in enumerate(sorted(out.items())):
        clip = node.get("inputs", {}).get("clip")
        if node.get("class_type") in TEXT_ENCODES and isinstance(clip, list) and clip[0] in loaders:
            guidance = node["inputs"].get("guidance", 3.5)
            out[nid] = {"class_type": "TestDiTConditioning", "_meta": node.get("_meta", {}),
                        "inputs": {"model": [models[0], 0], "seed": seed, "tokens": 8, "guidance": guidance}}
        elif node.get("class_type") == "StyleKitPromptBatch" and isinstance(clip, list) and clip[0] in loaders:
            # One tensor prompt per line, and the count output the latent's batch size reads.
            out[nid] = {"class_type": "TestDiTPromptBatch", "_meta": node.get("_meta", {}),
                        "inputs": {"model": [models[0], 0], "seed": seed, "tokens": 8, "guidance": 3.5,
                                   "text": node["inputs"]["text"]}}
    for nid in loaders:
        if any(isinstance(v, list) and v[0] == nid for n in out.values() for v in n.get("inputs", {}).values()):
            raise ValueError(f"node {nid} (a DiT text encoder) feeds a node other than a text encode")
        del out[nid]
    return out


def tiny(prompt: dict) -> dict:
    """A copy of an API prompt sized for the tiny fixtures (see module docstring)."""
    out = without_t5(prompt)
    for node in out.values():
        inputs = node.get("inputs", {})
        w, h = inputs.get("width"), inputs.get("height")
        if _literal_int(w) and _literal_int(h) and max(w, h) > TINY_SIDE:
            scale = TINY_SIDE / max(w, h)
            inputs["width"] = max(8, round(w * scale / 8) * 8)
            inputs["height"] = max(8, round(h * scale / 8) * 8)
        steps = inputs.get("steps")
        if _literal_int(steps) and steps > TINY_STEPS:
            factor = TINY_STEPS / steps
            inputs["steps"] = TINY_STEPS
            for key, value in inputs.items():
                step_index = key.endswith("_at_step") or key.endswith("_step_offset")
                # 10000 is core's "until the end" for end_at_step: it stays as it is.
                if step_index and _literal_int(value) and value < 10_000:
                    inputs[key] = min(TINY_STEPS, round(value * factor))
    return out
