"""One training run as a node performs it: prompts, latents, the loop, the file, the patched model.

DreamBooth (Ruiz et al. 2023): instance prompt "a [V] [class]", class prompt "a [class]", class
images from the frozen model, λ = 1. B-LoRA (Frenkel et al. 2024): prompt "A [v]", no prior, the
content and style blocks of SDXL. Both save a kohya LoRA under models/loras and return the model
with it applied through core's LoRA loader, so the output equals LoraLoader on the saved file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import comfy.sd
import torch

from .class_images import encode_prompt
from .errors import InputError
from .lora_file import LoraOutput, NonFiniteWeights, OutputError, lora_path, lora_state_dict
from .loss_curve import loss_curve_image
from .objectives import StepLoss
from .targets import BLOCK_LIST, projection_weights, select_sites
from .trainer import TrainingData, TrainSettings, conditioning_for_size, train_lora


@dataclass(frozen=True)
class TrainingJob:
    method: str                  # "DreamBooth" or "B-LoRA": file metadata and the curve's title
    instance_prompt: str         # "a sks dog"
    class_prompt: str | None     # "a dog"; None: no prior-preservation term
    target: str                  # a preset of targets.PRESETS
    block_list: str              # blocks for the "block list" preset
    lora_name: str               # relative to models/loras
    settings: TrainSettings
    overwrite: bool = False      # replace an existing LoRA of that name (only one StyleKit wrote)


@dataclass
class TrainingOutcome:
    model: object                        # ModelPatcher with the trained LoRA applied
    lora: dict[str, torch.Tensor]        # the kohya state dict written to `path`
    path: Path
    losses: list[StepLoss]
    loss_curve: torch.Tensor             # IMAGE [1, H, W, 3]


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images[..., :3])


def _metadata(job: TrainingJob, model, blocks: str, prior_images: int) -> dict[str, str]:
    s = job.settings
    config = type(model.model.model_config).__name__  # SD15, SD20, SD21UnclipH, SDXL, ...
    version = "sdxl_base_v1-0" if config.startswith("SDXL") else "sd_v2" if config.startswith("SD2") else "sd_v1"
    return {
        # kohya sd-scripts' fields, which LoRA browsers and other UIs read
        "ss_network_module": "networks.lora", "ss_network_dim": str(s.rank), "ss_network_alpha": str(s.lora_alpha),
        "ss_base_model_version": version,
        "ss_max_train_steps": str(s.steps), "ss_learning_rate": str(s.learning_rate), "ss_seed": str(s.seed),
        "stylekit_method": job.method, "stylekit_blocks": blocks, "stylekit_instance_prompt": job.instance_prompt,
        "stylekit_class_prompt": job.class_prompt or "", "stylekit_prior_weight": str(s.prior_weight),
        "stylekit_prior_images": str(prior_images),
    }


def run_training(job: TrainingJob, model, clip, vae, images: torch.Tensor, prior_images: torch.Tensor | None = None,
                 on_step: Callable[[int, StepLoss], None] | None = None) -> TrainingOutcome:
    """Train, save atomically under models/loras, and return the model with the LoRA applied.

    The output file is reserved before any work (folder and temporary file created), so a name
    that cannot be written fails at once; nothing is written if training fails or is cancelled."""
    try:
        with LoraOutput(lora_path(job.lora_name), job.overwrite) as output:
            return _train_into(output, job, model, clip, vae, images, prior_images, on_step)
    except OutputError as err:
        raise InputError("learning_rate" if isinstance(err, NonFiniteWeights) else "lora_name", str(err)) from None


def _train_into(output: LoraOutput, job: TrainingJob, model, clip, vae, images: torch.Tensor,
                prior_images: torch.Tensor | None, on_step) -> TrainingOutcome:
    try:
        sites = select_sites(model, job.target, job.block_list)
    except ValueError as err:
        raise InputError("block_list" if job.target == BLOCK_LIST else "target_blocks", str(err)) from None
    weight_keys = projection_weights(model, sites)

    subject = encode_latents(vae, images)
    ratio = vae.spacial_compression_encode()
    height, width = subject.shape[-2] * ratio, subject.shape[-1] * ratio
    data = TrainingData(subject, conditioning_for_size(encode_prompt(clip, job.instance_prompt), width, height))
    if job.class_prompt is not None and prior_images is not None and job.settings.prior_weight != 0.0:
        prior = encode_latents(vae, prior_images)
        data.prior = prior
        data.prior_conditioning = conditioning_for_size(encode_prompt(clip, job.class_prompt),
                                                        prior.shape[-1] * ratio, prior.shape[-2] * ratio)

    trained = train_lora(model, data, weight_keys, job.settings, on_step)
    lora = lora_state_dict(model, trained.factors, trained.alpha)
    blocks = ", ".join(f"{s.block[0]} {s.block[1]} ({s.diffusers_name})" for s in sites)
    prior_count = 0 if data.prior is None else data.prior.shape[0]
    path = output.commit(lora, _metadata(job, model, blocks, prior_count))
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    curve = loss_curve_image([l.subject for l in trained.losses],
                             [l.prior for l in trained.losses] if data.prior is not None else None,
                             title=f"{job.method} loss")
    return TrainingOutcome(patched, lora, path, trained.losses, curve)
