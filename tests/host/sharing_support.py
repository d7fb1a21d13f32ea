"""Helpers for the batch-sharing host tests: sample on the tiny fixtures, force ComfyUI to run cond
and uncond in one pass or in separate passes, and record the layouts it actually used."""
from __future__ import annotations

import contextlib

import comfy.patcher_extension
import comfy.sample
import torch

SIDE = 8  # latent side: 64 px images keep every UNet level (8, 4, 2, 1 tokens a side)


def encode(clip, text: str):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def sample(model, positive, negative, batch: int, cfg: float = 5.0, seed: int = 3, steps: int = 2,
           sampler: str = "euler", latent: torch.Tensor | None = None) -> torch.Tensor:
    latent = torch.zeros(batch, 4, SIDE, SIDE) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def recording(model):
    """A clone that records the cond_or_uncond of every diffusion-model call into `clone.layouts`."""
    m = model.clone()
    layouts: list[list[int]] = []

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, *args, **kwargs):
        layouts.append(list(transformer_options.get("cond_or_uncond", [])))
        return executor(x, timesteps, context, y, control, transformer_options, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_recorder", wrapper)
    m.layouts = layouts
    return m


@contextlib.contextmanager
def cond_and_uncond_apart(model, monkeypatch, batch: int):
    """Make ComfyUI run cond and uncond in separate passes through its own low-memory path:
    calc_cond_batch batches chunks only while model.memory_required(...) * 1.5 fits in free
    memory, so an estimate saying that only one chunk (`batch` rows) fits is what a small GPU gives."""
    base = model.model
    real = base.memory_required

    def estimate(input_shape, *args, **kwargs):
        return 1e30 if input_shape[0] > batch else real(input_shape, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(base, "memory_required", estimate)
        yield


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
