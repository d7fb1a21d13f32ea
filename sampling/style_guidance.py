"""Style-loss guidance (InstantStyle-Plus) as a post-CFG hook on a model clone.

At the chosen steps the hook takes the guided prediction D, forms the latent the official code
decodes (sampling/style_loss.py: official_mix), decodes it, embeds it with the style
discriminator and corrects D by the gradient of 1 − cos(style, reference) with respect to the
sampler's latent x: D' = D − scale·σ²·∂L/∂x. Installed as a `sampler_post_cfg_function`, so it
works with KSampler, KSamplerAdvanced and SamplerCustom(Advanced) with any core sampler.

Modes:
- "fast" (ours, an approximation): the gradient runs through the decoder and the discriminator only. x̂0 comes from the
  model's output with the predicted noise held fixed (D(x) = x − σ·ε̂, ∂D/∂x = I): no UNet
  backward, no UNet activations kept.
- "exact" (the default): the gradient also runs through the model: the model is evaluated again with autograd
  on (cond and uncond, with every patch and ControlNet of the call), CFG is re-applied, and the
  loss of the CFG prediction's x̂0 is differentiated, ∂L(decode(mix(D_cfg(x), x)))/∂x. The
  official code also backpropagates through the UNet, but (a batch-1 latent against the
  [uncond, cond] prompt batch, broadcast by the UNet) it scores image[0:1], the unconditional
  branch's x̂0; ours scores the prediction the sampler actually steps with, which is the
  gradient its update ε' = ε − √(1−ᾱ)·∇ is meant to follow. Costs a forward and a backward pass
  of the UNet per guided step.

The images the discriminator scores are preprocessed as the official guidance does
(style_discriminator.csd.guidance_preprocess: bilinear resize to 224, no crop); the reference
embeddings as CSD's evaluation (`preprocess`: bicubic resize, centre crop).

Gradients run in one place (host/gradients.py); `torch.autograd.grad` frees each step's
graph, so nothing outlives a step. The decoder is a frozen fp32 copy (the official code decodes
in fp32 "to avoid nan"): the VAE given (its encoder left out), or core's TAESD approximate
decoder from models/vae_approx.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import comfy.taesd.taesd
import folder_paths
import torch

from ..host.gradients import autograd_enabled, differentiable_copy, thaw_parameters_, thawed
from ..host.schedule import SigmaWindow, percent_window
from ..style_discriminator.csd import guidance_preprocess
from ..style_discriminator.files import StyleDiscriminator
from .style_loss import guided_denoised, official_mix, style_loss

FAST, EXACT = "fast", "exact"
MODES = (FAST, EXACT)
VAE_DECODER, TAESD_DECODER = "vae", "taesd (approximate)"
DECODERS = (VAE_DECODER, TAESD_DECODER)


class StyleGuidanceError(ValueError):
    """A setting or model that style guidance cannot work with; the message says the fix."""


@dataclass(frozen=True)
class StyleGuidanceSettings:
    scale: float = 100.0         # 0 = off (nothing installed)
    every: int = 1               # guide every k-th step of the schedule (1 = every step)
    start_percent: float = 0.0
    end_percent: float = 1.0
    mode: str = EXACT            # fast misses cos >= 0.8 at the top of the schedule (README table)
    decoder: str = TAESD_DECODER

    @property
    def off(self) -> bool:
        return self.scale == 0.0 or self.start_percent >= 1.0


class LatentDecoder:
    """Differentiable latent -> image: model-space latent [B, C, h, w] -> [B, 3, H, W] in [0, 1]."""

    def __init__(self, module: torch.nn.Module, to_vae_space: bool, output):
        self.module = module                  # frozen fp32 copy with .decode()
        self.to_vae_space = to_vae_space      # full VAEs decode VAE-space latents, TAESD model-space ones
        self.output = output                  # decoder output -> [0, 1] image
        first = next(module.parameters())
        self.device, self.dtype = first.device, first.dtype

    def __deepcopy__(self, memo):
        return self

    def __call__(self, latent: torch.Tensor, base_model) -> torch.Tensor:
        thaw_parameters_(self.module)  # free when already normal tensors
        if self.to_vae_space:
            latent = base_model.process_latent_out(latent)
        out = self.module.decode(latent.to(self.device, self.dtype))
        return self.output(out)


def vae_decoder(vae) -> LatentDecoder:
    """The VAE's decoder as an fp32 copy (a KL VAE's encoder, or TAESD's, is left out)."""
    model = vae.first_stage_model
    encoders = tuple(name for name in ("encoder", "quant_conv", "taesd_encoder") if hasattr(model, name))
    copy = differentiable_copy(model, dtype=torch.float32, device=vae.device, without=encoders)
    return LatentDecoder(copy, to_vae_space=True, output=vae.process_output)


def taesd_decoder(model_patcher) -> LatentDecoder:
    """Core's TAESD decoder for the model's latent format, from models/vae_approx."""
    latent_format = model_patcher.model.latent_format
    name = latent_format.taesd_decoder_name
    found = [f for f in folder_paths.get_filename_list("vae_approx") if name and f.startswith(name + ".")]
    if not found:
        raise StyleGuidanceError(f"the TAESD decoder for this model ({name or 'none exists'}) is not in "
                                 "models/vae_approx; put taesd_decoder.safetensors (SD1.x) or "
                                 "taesdxl_decoder.safetensors (SDXL) there, or choose the 'vae' decoder")
    path = folder_paths.get_full_path("vae_approx", found[0])
    with torch.inference_mode(False):
        taesd = comfy.taesd.taesd.TAESD(None, path, latent_channels=latent_format.latent_channels)
        del taesd.taesd_encoder
    taesd = taesd.to(comfy.model_management.vae_device(), torch.float32).requires_grad_(False).eval()
    return LatentDecoder(taesd, to_vae_space=False, output=lambda image: ((image + 1.0) / 2.0).clamp(0.0, 1.0))


class StyleGuidance:
    """The post-CFG hook. Shared by clones (`__deepcopy__` returns itself): it holds the decoder
    copy and the reference embeddings, both immutable."""

    def __init__(self, discriminator: StyleDiscriminator, decoder: LatentDecoder, reference: torch.Tensor,
                 settings: StyleGuidanceSettings, window: SigmaWindow, dtype: torch.dtype = torch.float32):
        self.dtype = dtype                    # precision of the guidance computation (tests use fp64)
        self.discriminator = discriminator
        self.decoder = decoder
        self.reference = reference            # [R, D] unit style embeddings
        self.settings = settings
        self.window = window

    def __deepcopy__(self, memo):
        return self

    def active(self, sigma: float, model_options: dict) -> bool:
        if not self.window.contains(sigma) or sigma <= 0.0:
            return False
        if self.settings.every == 1:
            return True
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return True
        step = int(torch.argmin((sigmas.float().cpu() - sigma).abs()))
        return step % self.settings.every == 0

    def loss(self, latent: torch.Tensor, base_model) -> torch.Tensor:
        """Σ over the batch of 1 − cos(style(decode(latent)), reference); differentiable."""
        csd = self.discriminator.load()
        thaw_parameters_(csd)
        images = self.decoder(latent, base_model).movedim(1, -1)
        pixels = guidance_preprocess(images.to(self.discriminator.load_device, self.dtype))
        embeddings = csd.style(pixels)
        return style_loss(embeddings, self.reference.to(embeddings)).sum()

    def gradient(self, args: dict) -> torch.Tensor:
        """∂L/∂x at the sampler's latent for this call (fast or exact mode)."""
        x, sigma, base_model = args["input"], args["sigma"], args["model"]
        with autograd_enabled():
            xg = thawed(x).detach().to(self.dtype).requires_grad_(True)
            s = sigma.to(xg).reshape(-1, *([1] * (xg.ndim - 1)))
            if self.settings.mode == EXACT:
                denoised = self._denoised_with_graph(xg, args)
            else:
                eps = (thawed(x).to(xg) - thawed(args["denoised"]).to(xg)) / s
                denoised = xg - s * eps.detach()
            loss = self.loss(official_mix(denoised, xg, sigma.to(xg)), base_model)
            (grad,) = torch.autograd.grad(loss, xg)
        return grad.detach()

    def _denoised_with_graph(self, xg: torch.Tensor, args: dict) -> torch.Tensor:
        """The CFG prediction at xg recomputed with autograd on (exact mode)."""
        model, options = args["model"], dict(args["model_options"])
        options["sampler_post_cfg_function"] = [f for f in options.get("sampler_post_cfg_function", [])
                                                if f is not self]
        thaw_parameters_(model.diffusion_model)
        sigma = thawed(args["sigma"])
        cond, uncond = args["cond"], args["uncond"]
        for control in _controls(cond, uncond):
            thaw_parameters_(control)
        try:
            out = comfy.samplers.calc_cond_batch(model, [cond, uncond], xg, sigma, options)
        except RuntimeError as err:
            if "nference tensor" not in str(err):
                raise
            raise StyleGuidanceError("exact mode cannot differentiate through a patch on this model that keeps "
                                     f"tensors made during the prompt ({err}); use mode 'fast'") from err
        uncond_pred = out[1] if uncond is not None else out[0]
        return comfy.samplers.cfg_function(model, out[0], uncond_pred, args["cond_scale"], xg, sigma,
                                           model_options=options, cond=cond, uncond=uncond)

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = args["sigma"]
        if not self.active(float(sigma.flatten()[0]), args["model_options"]):
            return denoised
        grad = self.gradient(args).to(denoised.device)
        return guided_denoised(denoised, grad, sigma.to(denoised.device), self.settings.scale)


def _controls(*conds) -> list[torch.nn.Module]:
    """The ControlNet modules attached to the conds (chained ControlNets included)."""
    found: list[torch.nn.Module] = []
    for cond in conds:
        for c in cond or []:
            control = c.get("control")
            while control is not None:
                module = getattr(control, "control_model", None)
                if isinstance(module, torch.nn.Module) and all(module is not m for m in found):
                    found.append(module)
                control = getattr(control, "previous_controlnet", None)
    return found


def check_model(model_patcher) -> None:
    import comfy.model_sampling

    sampling = model_patcher.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise StyleGuidanceError(f"style guidance supports ε- and v-prediction models (SD1.x, SD2.x, SDXL); this "
                                 f"model samples with {type(sampling).__name__}")


def make_decoder(settings: StyleGuidanceSettings, model_patcher, vae=None) -> LatentDecoder:
    if settings.decoder == VAE_DECODER:
        if vae is None:
            raise StyleGuidanceError("the 'vae' decoder needs a VAE: connect one, or choose 'taesd (approximate)'")
        return vae_decoder(vae)
    if settings.decoder == TAESD_DECODER:
        return taesd_decoder(model_patcher)
    raise StyleGuidanceError(f"unknown decoder {settings.decoder!r}; choose one of {', '.join(DECODERS)}")


def apply_style_guidance(model_patcher, discriminator: StyleDiscriminator, reference_images: torch.Tensor,
                         settings: StyleGuidanceSettings, vae=None):
    """A clone of `model_patcher` whose sampling is steered towards the style of the reference
    IMAGE(s) [R, H, W, C]. Scale 0 (or an empty window) returns a plain clone: sampling is
    bit-identical to the input model's."""
    clone = model_patcher.clone()
    if settings.off:
        return clone
    check_model(model_patcher)
    if settings.mode not in MODES:
        raise StyleGuidanceError(f"unknown mode {settings.mode!r}; choose one of {', '.join(MODES)}")
    if settings.every < 1:
        raise StyleGuidanceError("every must be at least 1 (1 = every step)")
    window = percent_window(model_patcher, settings.start_percent, settings.end_percent)
    decoder = make_decoder(settings, model_patcher, vae)
    reference = discriminator.style_embeddings(reference_images)
    hook = StyleGuidance(discriminator, decoder, reference, settings, window)
    clone.set_model_sampler_post_cfg_function(hook)
    return clone


def style_guidance_guider(model_patcher, positive, negative, cfg: float, discriminator: StyleDiscriminator,
                          reference_images: torch.Tensor, settings: StyleGuidanceSettings, vae=None):
    """A core CFGGuider (for SamplerCustomAdvanced) sampling the style-guided clone."""
    guider = comfy.samplers.CFGGuider(apply_style_guidance(model_patcher, discriminator, reference_images,
                                                           settings, vae=vae))
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider
