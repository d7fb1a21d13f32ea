"""Train a LoRA inside a prompt: DreamBooth with prior preservation; B-LoRA is a block filter.

Built on core's machinery, as core's own TrainLoraNode is: each adapted weight gets a trainable
`LoraDiff` (comfy.weight_adapter) as a weight wrapper on a ModelPatcher clone, and the loop runs
as a `Sampler` under a `CFGGuider`, so core loads the model, processes the conditionings and
applies the model's wrappers and patches exactly as when sampling. Unlike core's trainer it adds
the prior-preservation term, adapts only the chosen weights, regresses the model's own
prediction type (objectives.py), samples timesteps as the model was trained (uniform over its
discrete schedule) and leaves nothing behind on the shared model.

Per step: one subject latent (a seeded shuffle of the images) with the instance prompt and, when
λ > 0, one class latent with the class prompt; fresh noise and timestep for each; AdamW on the
LoRA factors, gradient norm clipped to 1 (diffusers' DreamBooth-LoRA / B-LoRA recipe).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import torch
from comfy.weight_adapter.lora import LoraDiff

from ..host.gradients import autograd_enabled, thaw_parameters_, thawed
from .objectives import Prediction, StepLoss, dreambooth_loss, noised, prediction_target, raw_prediction

log = logging.getLogger("stylekit.training")

POSITIVE, NEGATIVE = "positive", "negative"  # the guider's slots: instance prompt, class prompt


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    learning_rate: float
    rank: int
    prior_weight: float = 1.0
    seed: int = 0
    alpha: float | None = None          # LoRA scale = alpha / rank; None: alpha = rank (scale 1)
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TrainingData:
    subject: torch.Tensor                        # [N, C, h, w] VAE latents of the subject images
    subject_conditioning: list                   # CONDITIONING of the instance prompt "a [V] dog"
    prior: torch.Tensor | None = None            # [M, C, h', w'] latents of class images
    prior_conditioning: list | None = None       # CONDITIONING of the class prompt "a dog"


@dataclass
class TrainedLoRA:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]   # weight key -> (up, down), fp32 on CPU
    alpha: float
    losses: list[StepLoss] = field(default_factory=list)


def prediction_type(model) -> Prediction:
    """What the model's network predicts, read from its sampling object."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, (comfy.model_sampling.EDM, comfy.model_sampling.CONST)) or not hasattr(sampling, "sigmas"):
        raise ValueError(f"training supports discrete eps, v and x0 models; this model samples with "
                         f"{type(sampling).__name__}")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(sampling, comfy.model_sampling.X0):
        return "x0"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "eps"
    raise ValueError(f"unknown prediction type of {type(sampling).__name__}")


def conditioning_for_size(conditioning: list, width: int, height: int) -> list:
    """The conditioning with the image size set (SDXL's size embedding: original = target =
    training size, crop 0, as the diffusers trainers use; other models ignore these keys)."""
    size = {"width": width, "height": height, "target_width": width, "target_height": height}
    return [[tensor, {**extra, **size}] for tensor, extra in conditioning]


def new_adapter(weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> LoraDiff:
    """A trainable LoRA for `weight` [out, in]: down ~ N(0, 1/rank²), up = 0 (diffusers'
    LoRALinearLayer / peft "gaussian"), so training starts from the unchanged model."""
    out_features, in_features = weight.shape[0], weight.shape[1:].numel()
    down = torch.randn(rank, in_features, generator=generator) / rank
    up = torch.zeros(out_features, rank)
    with torch.random.fork_rng(devices=[]):  # LoraDiff builds Linear layers: keep the global RNG untouched
        adapter = LoraDiff((up, down, alpha, None, None, None))
    return adapter.to(weight.device)


class _Shuffled:
    """Indices 0..n-1 in a fresh seeded permutation per epoch, as a shuffled data loader gives them."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator, self.queue = n, generator, []

    def next(self) -> int:
        if not self.queue:
            self.queue = torch.randperm(self.n, generator=self.generator).tolist()
        return self.queue.pop(0)


class TrainingSampler(comfy.samplers.Sampler):
    """Runs `loop(guider, model_options)` where core would sample: the model is loaded and the
    guider's conditionings are processed by then. Returns the latent unchanged."""

    def __init__(self, loop: Callable):
        self.loop = loop

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.loop(model_wrap, extra_args["model_options"])
        return latent_image


class _Loop:
    def __init__(self, data: TrainingData, adapters: dict[str, LoraDiff], settings: TrainSettings,
                 on_step: Callable[[int, StepLoss], None] | None):
        self.data, self.adapters, self.settings, self.on_step = data, adapters, settings, on_step
        self.losses: list[StepLoss] = []

    def __call__(self, guider, model_options: dict) -> None:
        model = guider.inner_model
        thaw_parameters_(model)  # the loaded weights are inference tensors (host/gradients.py)
        sampling = model.model_sampling
        kind = prediction_type(guider.model_patcher)
        device = guider.model_patcher.load_device
        dtype = model.get_dtype()
        generator = torch.Generator().manual_seed((self.settings.seed + 1) % 2**64)  # seeds reach 2^64 - 1

        # Latents, noise, targets and the loss stay fp32: core casts the UNet input to its dtype
        # and returns the denoised estimate in fp32.
        def latents(raw: torch.Tensor) -> torch.Tensor:
            return model.process_latent_in(raw.to(device=device, dtype=torch.float32))

        def draw(x0: torch.Tensor, conds) -> tuple[torch.Tensor, torch.Tensor]:
            noise = torch.randn(x0.shape, generator=generator).to(device)
            timestep = torch.randint(0, len(sampling.sigmas), (x0.shape[0],), generator=generator)
            sigma = sampling.sigma(timestep).to(device)
            x_t = noised(x0, noise, sigma)
            denoised = comfy.samplers.calc_cond_batch(model, [conds], x_t, sigma, model_options)[0]
            return (raw_prediction(kind, denoised, x_t, sigma, sampling.sigma_data),
                    prediction_target(kind, x0, noise, sigma, sampling.sigma_data))

        subject = latents(self.data.subject)
        use_prior = self.data.prior is not None and self.settings.prior_weight != 0.0
        prior = latents(self.data.prior) if use_prior else None
        subject_order = _Shuffled(subject.shape[0], generator)
        prior_order = _Shuffled(prior.shape[0], generator) if use_prior else None

        params = [p for a in self.adapters.values() for p in (a.lora_up.weight, a.lora_down.weight)]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay)
        # fp16 activations underflow small gradients; scale the loss as mixed-precision trainers do.
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)
        progress = comfy.utils.ProgressBar(self.settings.steps)
        log.info("training %d LoRA layers (rank %d) for %d steps, %s prediction, prior term %s",
                 len(self.adapters), self.settings.rank, self.settings.steps, kind,
                 f"on {prior.shape[0]} class images" if use_prior else "off")
        for step in range(self.settings.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            i = subject_order.next()
            subject_pred, subject_target = draw(subject[i:i + 1], guider.conds[POSITIVE])
            prior_pred = prior_target = None
            if use_prior:
                j = prior_order.next()
                prior_pred, prior_target = draw(prior[j:j + 1], guider.conds[NEGATIVE])
            total, subject_term, prior_term = dreambooth_loss(subject_pred, subject_target, prior_pred,
                                                              prior_target, self.settings.prior_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            loss = StepLoss(subject_term.item(), prior_term.item(), self.settings.prior_weight if use_prior else 0.0)
            del total, subject_term, prior_term, subject_pred, subject_target, prior_pred, prior_target
            self.losses.append(loss)
            progress.update_absolute(step + 1)
            if self.on_step is not None:
                self.on_step(step, loss)
        log.info("training finished: last step subject loss %.4f, prior loss %.4f",
                 self.losses[-1].subject, self.losses[-1].prior)


def _remove_wrappers(model_patcher, adapters: dict[str, LoraDiff]) -> None:
    """Take our adapters off the shared modules. Core resets a module's weight functions only
    when it (re)loads the model; ModelPatcher.partially_load skips that for a model already fully
    loaded on a GPU, and once this clone is gone its parent counts as loaded, so the trained LoRA
    would run on in the next prompt. (On CPU every load resets them; this keeps both the same.)"""
    ours = {id(a) for a in adapters.values()}
    for module in model_patcher.model.modules():
        functions = module.__dict__.get("weight_function")
        if functions:
            module.weight_function = [f for f in functions if id(f) not in ours]


def train_lora(model, data: TrainingData, weight_keys: list[str], settings: TrainSettings,
               on_step: Callable[[int, StepLoss], None] | None = None) -> TrainedLoRA:
    """Train a LoRA on `weight_keys` (BaseModel state-dict keys) of a clone of `model` (a
    ModelPatcher, left unchanged) and return its factors and per-step losses.

    Raises comfy's InterruptProcessingException at a step boundary when the prompt is cancelled.
    """
    if settings.steps < 1 or settings.rank < 1:
        raise ValueError("steps and rank must be at least 1")
    if data.prior is not None and data.prior_conditioning is None:
        raise ValueError("prior latents need the class prompt's conditioning")
    prediction_type(model)  # fail before any work on an unsupported model
    with autograd_enabled():
        clone = model.clone()
        generator = torch.Generator().manual_seed(settings.seed)
        adapters = {}
        for key in weight_keys:
            adapters[key] = new_adapter(comfy.utils.get_attr(clone.model, key), settings.rank,
                                        settings.lora_alpha, generator)
            clone.add_weight_wrapper(key, adapters[key])
        loop = _Loop(data, adapters, settings, on_step)
        guider = comfy.samplers.CFGGuider(clone)
        class_conditioning = data.prior_conditioning if data.prior_conditioning is not None else data.subject_conditioning
        guider.set_conds(thawed(data.subject_conditioning), thawed(class_conditioning))
        placeholder = torch.zeros_like(data.subject[:1], device="cpu", dtype=torch.float32)
        try:
            guider.sample(placeholder, placeholder, TrainingSampler(loop), torch.ones(2), seed=settings.seed)
        finally:
            _remove_wrappers(clone, adapters)
        factors = {key: (a.lora_up.weight.detach().float().cpu().clone(), a.lora_down.weight.detach().float().cpu().clone())
                   for key, a in adapters.items()}
    return TrainedLoRA(factors, settings.lora_alpha, loop.losses)
