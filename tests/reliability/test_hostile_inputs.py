"""Hostile inputs a stranger can send through /prompt: inputs that size work or memory beyond
their bounds, NaN floats, extreme seeds, LoRA names that cannot or must not be written. Each is
refused at once (before the node does any work) with an error naming the node, the input and the bound, writes nothing,
and leaves the server alive with its memory where it was; two long runs are cancelled with
/interrupt and leave no partial file."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import pytest

from stylekit.tests.support.paths import BASE_DIR
from stylekit.tests.support.server import PromptFailed, PromptRejected, ServerError

from . import prompts as p
from .conftest import OUTCOMES, REFUSAL_SECONDS

ERROR, RUNS = "node error", "ran"
# Whole-prompt bounds (Case.seconds, RSS_GROWTH_MB). A literal input the node refuses is refused
# by its validate_inputs at /prompt, before anything runs (tests/host/test_prompt_validation.py):
# LITERAL, 1 s. An input that arrives through a link (a batch, a latent) or needs a model (token
# counts) is refused by the node when it runs; core caches only the last prompt's outputs, so the
# loaders before it may run again first (an IP-Adapter and CLIP vision: 1-2 s and ~1 GB here):
# LINKED, 5 s. What these bounds tell apart is the attack: minutes of work or tens of GB before failing.
LITERAL, LINKED = 1.0, 5.0
RSS_GROWTH_MB = 2048
MAX_SEED = 2**64 - 1
LORAS = BASE_DIR / "models" / "loras"
IPA, PB, DB = "StyleKit IP-Adapter", "StyleKit Prompt Batch", "StyleKit DreamBooth LoRA Train"


@dataclass
class Case:
    name: str
    build: Callable[[], dict]
    outcome: str = ERROR
    says: tuple[str, ...] = ()
    tags: list[str] = field(default_factory=list)
    seconds: float = LITERAL   # whole-prompt bound for a refusal (see the bounds above)


def _prompt_batch(text: str):
    def build():
        prompt = p.txt2img(seed=1)
        prompt["80"] = {"class_type": "StyleKitPromptBatch", "inputs": {"clip": ["1", 1], "text": text}}
        prompt["5"]["inputs"]["positive"] = ["80", 0]
        return prompt
    return build


def _references(count: int):
    def build():
        prompt = p.with_ip_adapter(seed=1)
        prompt["64"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["12", 0], "amount": count}}
        prompt["13"]["inputs"]["image"] = ["64", 0]
        return prompt
    return build


def _set(build, node: str, **inputs):
    def inner():
        prompt = build()
        prompt[node]["inputs"].update(inputs)
        return prompt
    return inner


def _inversion(**inputs):
    def build():
        prompt = p.txt2img(seed=1)
        prompt.update(p.inversion_nodes(["4", 0], **inputs))
        prompt["5"]["inputs"]["latent_image"] = ["40", 0]
        return prompt
    return build


def _vsp_sampler(**inputs):
    def build():
        prompt = p.txt2img(seed=1, batch=2)
        prompt["41"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["42", 0], "vae": ["1", 2]}}
        prompt["42"] = {"class_type": "LoadImage", "inputs": {"image": "stylekit_style.png"}}
        prompt["43"] = {"class_type": "ImageScale", "inputs": {"image": ["42", 0], "upscale_method": "bilinear",
                                                               "width": p.SIDE, "height": p.SIDE, "crop": "center"}}
        prompt["41"]["inputs"]["pixels"] = ["43", 0]
        prompt["30"] = {"class_type": "StyleKitVisualStylePromptingReferenceSampler", "inputs": dict(
            model=["1", 0], positive=["2", 0], negative=["3", 0], reference_positive=["2", 0],
            latent_image=["4", 0], reference_latent=["41", 0], seed=1, steps=2, cfg=5.0, sampler_name="euler",
            scheduler="normal", color_calibration=False, calibration_start_percent=0.85,
            calibration_end_percent=0.9, blocks="highest-resolution up block", custom_blocks="")}
        prompt["30"]["inputs"].update(inputs)
        prompt["6"]["inputs"]["samples"] = ["30", 0]
        del prompt["5"]
        return prompt
    return build


def training(lora_name: str = "StyleKit/reliability_lora", **inputs) -> dict:
    settings = dict(model=["1", 0], clip=["1", 1], vae=["1", 2], images=["86", 0], identifier="sks",
                    class_noun="lighthouse", prior_weight=0.0, steps=2, learning_rate=1e-4, rank=2,
                    target_blocks="block list", block_list="output 11", seed=0, lora_name=lora_name, overwrite=False)
    settings.update(inputs)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": p.txt2img(1)["1"]["inputs"]["ckpt_name"]}},
        "85": {"class_type": "LoadImage", "inputs": {"image": "stylekit_subject_1.png"}},
        "86": {"class_type": "ImageScale", "inputs": {"image": ["85", 0], "upscale_method": "bilinear",
                                                      "width": p.SIDE, "height": p.SIDE, "crop": "center"}},
        "87": {"class_type": "StyleKitDreamBoothTrain", "inputs": settings},
    }


def _class_images(**inputs):
    settings = dict(model=["1", 0], clip=["1", 1], vae=["1", 2], class_noun="dog", count=2, width=64, height=64,
                    steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", seed=0, batch_size=2)
    settings.update(inputs)
    return lambda: {"1": training()["1"], "88": {"class_type": "StyleKitClassImages", "inputs": settings},
                    "89": {"class_type": "PreviewImage", "inputs": {"images": ["88", 0]}}}


def _chunks_line(chunks: int) -> str:
    return "word " * (75 * chunks - 5)


CASES = [
    # Inputs that size work or memory.
    Case("prompt batch: 12 lines of 1..12 CLIP chunks (2.1 M tokens of padding)",
         _prompt_batch("\n".join(_chunks_line(n) for n in range(1, 13))), says=(PB, "text", "4x the shortest"),
         seconds=LINKED),   # the padding needs the CLIP tokenizer
    Case("prompt batch: 300 lines", _prompt_batch("a lighthouse\n" * 300), says=(PB, "text", "limit of 256")),
    # A 1 MB prompt refused at /prompt: 0.01 s for the whole request here (core parses and validates
    # it in milliseconds). Refused while running, as before validate_inputs, it took 16-21 s: the
    # failed node's 1 MB inputs go into core's execution_error, the log and /history.
    Case("block_weights: a 1 MB key", lambda: p.with_ip_adapter(
        seed=1, blocks="custom (block_weights)", block_weights='{"output' + " " * (1 << 20) + 'x": 1.0}'),
         says=(IPA, "block_weights", "limit of 20000")),
    Case("custom_blocks: 40,000 spaces", lambda: p.with_style_aligned(
        seed=1, blocks="custom", custom_blocks="output" + " " * 40_000 + "x"),
         says=("StyleKit StyleAligned", "custom_blocks", "limit of 4000")),
    Case("ipadapter: 65 references", _references(65), says=(IPA, "image", "limit of 64"), seconds=LINKED),
    Case("class images: 2000 x 4096x4096", _class_images(count=2000, width=4096, height=4096),
         says=("StyleKit DreamBooth Class Images", "count", "beyond the limit")),
    Case("inversion: 10,000 steps of a 4096x4096 batch of 4",
         _set(_inversion(steps=10000), "4", width=4096, height=4096, batch_size=4),
         says=("StyleKit DDIM Inversion", "steps", "GiB"), seconds=LINKED),   # the latent is linked
    Case("dreambooth: 1 MB identifier", lambda: training(identifier="x" * (1 << 20)), says=(DB, "identifier", "limit")),
    # NaN floats (JSON carries NaN; core's min/max checks let it through).
    Case("ipadapter: weight NaN", lambda: p.with_ip_adapter(seed=1, weight=float("nan")),
         says=(IPA, "weight", "not a number")),
    Case("style aligned: shared_score_shift NaN", lambda: p.with_style_aligned(seed=1, shared_score_shift=float("nan")),
         says=("StyleKit StyleAligned", "shared_score_shift", "not a number")),
    Case("inversion: cfg NaN", _inversion(cfg=float("nan")), says=("StyleKit DDIM Inversion", "cfg", "not a number")),
    Case("vsp sampler: cfg NaN", _vsp_sampler(cfg=float("nan")),
         says=("StyleKit Visual Style Prompting", "cfg", "not a number")),
    Case("style guidance: scale NaN", lambda: p.with_style_guidance(seed=1, scale=float("nan")),
         says=("StyleKit Style Guidance", "scale", "not a number")),
    Case("dreambooth: prior_weight NaN", lambda: training(prior_weight=float("nan")),
         says=(DB, "prior_weight", "not a number")),
    # Seeds at the top of their range, where a step or 1 is added.
    Case("vsp sampler: seed 2^64-1", _vsp_sampler(seed=MAX_SEED), outcome=RUNS),
    Case("dreambooth: seed 2^64-1", lambda: training(seed=MAX_SEED, lora_name="StyleKit/reliability_seed",
                                                     overwrite=True), outcome=RUNS),
    # LoRA names: refused before any training, nothing written.
    Case("lora_name: 300 characters", lambda: training(lora_name="x" * 300), says=(DB, "lora_name", "bytes long")),
    Case("lora_name: a NUL", lambda: training(lora_name="StyleKit/a\0b"), says=(DB, "lora_name", "control character")),
    Case("lora_name: a newline", lambda: training(lora_name="StyleKit/a\nb"), says=(DB, "lora_name", "control character")),
    Case("lora_name: con", lambda: training(lora_name="con"), says=(DB, "lora_name", "reserved")),
    # These two depend on the files in models/loras: refused when the node runs, before training.
    Case("lora_name: a path through an existing file", lambda: training(lora_name="stylekit_bad_text.safetensors/x"),
         says=(DB, "lora_name", "cannot write"), seconds=LINKED),
    Case("lora_name: overwrite a LoRA StyleKit did not write", lambda: training(
        lora_name="stylekit_bad_text", overwrite=True), says=(DB, "lora_name", "not trained by StyleKit"),
         seconds=LINKED),
]


def _files(folder) -> dict[str, int]:
    """Files under `folder` (hidden temporaries included) and their mtimes; links are not followed."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
    return found


def _rss_mb(server) -> float:
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


@pytest.fixture(scope="module")
def warm(server, bad_files):
    """The loaders every case shares, run once so that a case's time is its own node's."""
    for build in (lambda: p.with_ip_adapter(seed=5), lambda: p.with_style_guidance(seed=5), _vsp_sampler(seed=5)):
        server.run(build(), timeout=600)
    return server


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_fast_writes_nothing_and_the_server_keeps_serving(warm, case):
    server = warm
    loras_before = _files(LORAS)
    rss_before = _rss_mb(server)
    started = time.monotonic()
    try:
        server.run(case.build(), timeout=600)
        outcome, message = RUNS, ""
    except (PromptRejected, PromptFailed) as err:
        outcome, message = ERROR, str(err)
    except ServerError as err:
        outcome, message = "crash", str(err)
    elapsed = time.monotonic() - started
    OUTCOMES.append((case.name, outcome, message))
    assert server.alive(), f"the server died on {case.name}:\n{server.log_tail()}"
    assert server.get("/system_stats")["system"]
    assert outcome == case.outcome, message or "the prompt ran"
    missing = [s for s in case.says if s not in message]
    assert not missing, f"the error does not say {missing}: {message[:500]}"
    # Core repeats a validate_inputs error once per input the validator names (at most 8 here).
    assert len(message) < 4000, "the error echoes its input unbounded"
    growth = _rss_mb(server) - rss_before
    new_files = {k for k in _files(LORAS)} - set(loras_before)
    if case.outcome == ERROR:
        REFUSAL_SECONDS.append((case.name, elapsed))
        assert growth < RSS_GROWTH_MB, f"server RSS grew {growth:.0f} MB on a refused prompt"
        assert elapsed < case.seconds, f"refused after {elapsed:.2f} s"
        assert not new_files, f"a refused prompt wrote {new_files}"
    for name in new_files:
        (LORAS / name).unlink(missing_ok=True)


def _interrupt_when_running(server, prompt: dict, node_type: str) -> dict:
    """Queue `prompt`, send /interrupt once `node_type` executes, and return its /history entry."""
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        running = server.get("/queue")["queue_running"]
        if running and running[0][1] == prompt_id:
            break
        time.sleep(0.1)
    time.sleep(3.0)   # well inside the long node
    server.post("/interrupt", {})
    try:
        server.wait(prompt_id, timeout=300)
    except PromptFailed:
        pass
    return server.get(f"/history/{prompt_id}")[prompt_id]


@pytest.mark.parametrize("what", ["inversion", "training"])
def test_interrupt_mid_run_stops_it_and_leaves_no_partial_file(warm, what):
    server = warm
    if what == "inversion":
        prompt, node = _inversion(steps=5000, cfg=2.0)(), "StyleKitDDIMInversion"
    else:
        prompt, node = training(lora_name="StyleKit/reliability_interrupted", steps=100000), "StyleKitDreamBoothTrain"
    watched = (LORAS, BASE_DIR / "output")
    before = {f for folder in watched for f in _files(folder)}
    started = time.monotonic()
    entry = _interrupt_when_running(server, prompt, node)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    OUTCOMES.append((f"/interrupt mid-{what}", "node error" if "execution_interrupted" in kinds else "ran", ""))
    assert "execution_interrupted" in kinds, kinds
    assert time.monotonic() - started < 120
    assert server.alive() and server.get("/system_stats")["system"]
    written = {f for folder in watched for f in _files(folder)} - before
    assert not [f for f in written if "reliability_interrupted" in f or f.endswith(".partial")], written
