"""Measure a patched model against the plain one in the same process, interleaved.

Per-step time: both models sample the same latent with the same seed, alternating plain/patched
for `repeats` rounds; the reported ratio is the median of the per-round ratios, so drift on a
shared machine hits both sides of a pair alike. Memory: resident memory added by
building `clones` patched clones in a chain, relative to the size of the model's weights.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from stylekit.tests.fixtures.registry import SD15_CHECKPOINT, SDXL_CHECKPOINT
from stylekit.tests.support.host import load_checkpoint

CHECKPOINTS = {"sd15": SD15_CHECKPOINT.filename, "sdxl": SDXL_CHECKPOINT.filename}


@dataclass
class Case:
    name: str                                   # row label, e.g. "IP-Adapter base"
    model: str                                  # "sd15" or "sdxl"
    patch: Callable                             # (model, clip, vae) -> patched ModelPatcher clone
    batch: int = 1
    side: int = 512                             # image side in pixels (latent side / 8)
    steps: int = 2
    goal: float | None = None                   # target time ratio, if the issue sets one
    memory_clones: int = 0                      # also measure memory of this many chained clones
    run: Callable | None = None                 # custom timed call (model, inputs) for non-sampler work
    notes: str = ""
    peak_memory: bool = False                   # also record peak resident memory added during the timed runs
    text_tokens: int = 8                        # DiT cases: prompt tokens of the seeded conditioning
    build: Callable | None = None               # () -> (model, positive, negative): a model the harness does not load
    cpu_time: bool = False                      # time this process's CPU seconds, not wall time (steadier on a shared machine)


@dataclass
class Result:
    case: Case
    plain_step_s: float
    patched_step_s: float
    ratio: float
    memory_added_pct: float | None = None     # all `memory_clones` clones, % of the model's weights
    memory_per_clone_mb: float | None = None
    extra: dict = field(default_factory=dict)


def _conditioning(clip, text: str):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def _sample(model, positive, negative, latent, steps: int) -> None:
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                        disable_pbar=True, seed=0)


def _weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.parameters())


def _dit(name: str, text_tokens: int = 8):
    """Tiny core Flux / SD3.5-Large-layout MMDiT (tests/support/tiny_dits.py): full token counts at the
    case's side, width reduced (no tiny T5 exists; the conditioning is seeded tensors). scaled_flux:
    core's Flux at a quarter of the real width with the real head size (SCALED_FLUX)."""
    from stylekit.tests.support.tiny_dits import dit_conditioning, tiny_flux, tiny_mmdit

    if name == "tiny_flux":
        model = tiny_flux(seed=0)
    elif name == "scaled_flux":
        model = tiny_flux(seed=0, **SCALED_FLUX)
    else:
        model = tiny_mmdit(seed=0)
    return (model, dit_conditioning(model, tokens=text_tokens, seed=1),
            dit_conditioning(model, tokens=text_tokens, seed=2))


# Flux at a quarter of flux1-dev's width (768 = 6 heads of the real 128, the real rotary axes) and
# one double to two single blocks (the real 19 : 38). Run at half the side and a quarter of the
# prompt tokens, every FLOP share of a block (attention against projections: tokens / width; text
# against image tokens) is flux1-dev's at the full side: 512 px with 128 tokens here stands for
# 1024 px with 512 T5 tokens there.
SCALED_FLUX = dict(hidden_size=768, num_heads=6, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=2)

DIT_MODELS = ("tiny_flux", "tiny_sd35", "scaled_flux")


def measure(case: Case, repeats: int = 3) -> Result:
    if case.build is not None:
        model, positive, negative = case.build()
        clip = vae = None
        channels = model.model.latent_format.latent_channels
    elif case.model in DIT_MODELS:
        model, positive, negative = _dit(case.model, case.text_tokens)
        clip = vae = None
        channels = 16
    else:
        model, clip, vae = load_checkpoint(CHECKPOINTS[case.model])
        positive, negative = _conditioning(clip, "a lighthouse"), _conditioning(clip, "")
        channels = 4
    patched = case.patch(model, clip, vae)
    latent = torch.zeros(case.batch, channels, case.side // 8, case.side // 8)
    run = case.run or (lambda m: _sample(m, positive, negative, latent, case.steps))
    run(model)  # warm-up: loads weights, builds kernels
    run(patched)
    plain_times, patched_times = [], []
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for name, target, times in (("plain", model, plain_times), ("patched", patched, patched_times)):
            base = psutil.Process().memory_info().rss
            clock = time.process_time if case.cpu_time else time.perf_counter
            started = clock()
            if case.peak_memory:  # polled on a thread during the timed run itself: no extra run
                peak = peak_rss_during(lambda: run(target))
                peaks[name] = max(peaks.get(name, 0.0), (peak - base) / 2**20)
            else:
                run(target)
            times.append((clock() - started) / case.steps)
    ratios = [p / q for p, q in zip(patched_times, plain_times)]
    result = Result(case, statistics.median(plain_times), statistics.median(patched_times), statistics.median(ratios))
    if case.memory_clones:
        added = memory_of_clones(model, clip, vae, case)
        result.memory_added_pct = 100.0 * added / _weights_bytes(model)
        result.memory_per_clone_mb = added / case.memory_clones / 2**20
    if case.peak_memory:
        result.extra["peak_rss_added_mb"] = peaks
    return result


def peak_rss_during(fn: Callable[[], None], interval_s: float = 0.005) -> int:
    """The highest resident memory (bytes) of this process while fn runs, polled on a thread."""
    import threading

    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(interval_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], process.memory_info().rss)


def memory_of_clones(model, clip, vae, case: Case) -> int:
    """Resident bytes added by building `case.memory_clones` patched clones in a chain."""
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    chain, current = [], model
    for _ in range(case.memory_clones):
        current = case.patch(current, clip, vae)
        chain.append(current)
    gc.collect()
    return max(process.memory_info().rss - before, 0)
