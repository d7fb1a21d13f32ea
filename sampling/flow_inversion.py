"""Inversion of the rectified-flow ODE (Flux, SD3/3.5) on core sampling: inverse Euler, trajectory kept.

Flow models in ComfyUI sample x_σ = (1 − σ)·x0 + σ·noise, σ in [0, 1] (model_sampling CONST);
the model predicts the velocity v and the wrapper returns D(x, σ) = x − σ·v, so the ODE is
dx/dσ = v = (x − D(x, σ))/σ and a forward Euler step is x' = x + v(x, σ)·(σ' − σ). Inversion runs
the same step towards higher sigma with the velocity evaluated on the current state at the
destination level, v(x_i, σ_{i+1}) (the inverse Euler of Stable Flow and of DDIM inversion; it
never needs the model at σ = 0, where D carries no velocity), optionally refined by fixed-point
iterations on the implicit step (ReNoise-style, one model call each). It runs through core's
CFGGuider and KSAMPLER with the schedule reversed, so conditioning, CFG, Flux guidance, patches,
wrappers and the progress bar work as in any sampling.

The trajectory is kept in the model's own space (after process_latent_in), on the CPU: for CONST
sampling the model's input is the state itself (calculate_input is the identity), so a replayed
reference row hands the model exactly the tensor the inversion computed, bit for bit, with no
process_latent_out/in round trip in between (the UNet lesson: the model must see the replayed
latent exactly as the forward pass would).

    inversion = invert_flow(model, latent, positive, negative, sigmas, cfg=1.0)
    inversion.states[j]       # x at inversion.sigmas[j] (sampling order, model space)
    inversion.noise           # states[0]: sample forward with it as the noise, no latent added
    inversion.state_at(sigma) # the state a replayed reference row gives the model at sigma
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..host.trajectory import step_position
from .inversion import inverse_euler_step


@dataclass(frozen=True)
class FlowInversion:
    """An inverted flow trajectory, model space, sampling order (index 0 the noisiest state).

    sigmas [S+1] descending with sigmas[-1] = 0; states [S+1, B, C, H, W] with states[j] the x at
    sigmas[j] (states[-1] the input after process_latent_in); cfg the guidance it ran with.
    """
    sigmas: torch.Tensor
    states: torch.Tensor
    cfg: float

    def __post_init__(self):
        if self.states.shape[0] != self.sigmas.shape[0]:
            raise ValueError(f"{self.states.shape[0]} states for {self.sigmas.shape[0]} sigmas")

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def noise(self) -> torch.Tensor:
        """The inverted state. At sigmas[0] = 1 (full schedules) core starts from σ·noise + (1 − σ)·latent
        = this tensor exactly when it is passed as the noise (any latent)."""
        return self.states[0]

    def state_at(self, sigma: float) -> torch.Tensor:
        """The state at `sigma`: exactly states[j] at a schedule point, the linear path between points
        elsewhere (an Euler step is linear in sigma), clamped to the ends. Shapes: -> [B, C, H, W]."""
        j, w = step_position(self.sigmas, float(sigma))
        if w == 0.0 or j >= self.steps:
            return self.states[j]
        return torch.lerp(self.states[j], self.states[j + 1], w)

    def latents(self, process_latent_out) -> torch.Tensor:
        """The states as LATENT samples (outer space), e.g. to decode them. Shapes: -> [S+1, B, C, H, W]."""
        return torch.stack([process_latent_out(x) for x in self.states])


def controlled_step(x: torch.Tensor, x_euler: torch.Tensor, sigma: float, sigma_next: float,
                    target_noise: torch.Tensor, controller: float) -> torch.Tensor:
    """RF-Inversion's controlled forward step (Rout et al. 2024, Algorithm 1): the velocity v of the
    inverse Euler step x_euler = x + v·(σ' − σ) steered towards the straight path to a fixed noise y₁,
    v̂ = v + γ·(u − v) with u = (y₁ − x)/(1 − σ), so x' = (1 − γ)·x_euler + γ·(x + u·(σ' − σ)).
    γ = 0 is plain inverse Euler; γ = 1 lands on y₁ at σ' = 1. Shapes: x, x_euler, target_noise alike."""
    if controller == 0.0:
        return x_euler
    toward_noise = x + (target_noise - x) / (1.0 - sigma) * (sigma_next - sigma)
    return torch.lerp(x_euler, toward_noise, controller)


@torch.no_grad()
def sample_flow_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, trajectory=None,
                          fixed_point_iterations: int = 0, controller: float = 0.0,
                          target_noise: torch.Tensor | None = None):
    """Inverse Euler of the rectified-flow ODE over ascending sigmas; appends every x to `trajectory`, on the CPU.

    x' = x + v·(σ' − σ), v = (x − D(x, σ'))/σ'; with fixed_point_iterations the velocity is
    re-evaluated at the current estimate of x' (the exact inverse of a forward Euler step); with a
    controller γ > 0 each step is RF-Inversion's controlled step towards target_noise (controlled_step).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if trajectory is not None:
        trajectory.append(x.to("cpu", copy=True))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_next, denoised = inverse_euler_step(model, x, x, sigma, sigma_next, s_in, extra_args,
                                              fixed_point_iterations)
        if controller:
            x_next = controlled_step(x, x_next, float(sigma), float(sigma_next), target_noise.to(x), controller)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_next, "sigma_hat": sigma_next, "denoised": denoised})
        x = x_next
        if trajectory is not None:
            trajectory.append(x.to("cpu", copy=True))
    return x


def check_flow_model(model_patcher) -> None:
    """Refuse models that do not sample x = (1 − σ)·x0 + σ·noise (SD1.x/SDXL: use DDIM inversion)."""
    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise ValueError(f"flow inversion needs a rectified-flow model (Flux, SD3/3.5); this model samples with "
                         f"{type(sampling).__name__}")


def invert_flow(model_patcher, latent_image: torch.Tensor, positive, negative, sigmas: torch.Tensor,
                cfg: float = 1.0, fixed_point_iterations: int = 0, seed: int = 0,
                progress: bool = True, controller: float = 0.0) -> FlowInversion:
    """Invert `latent_image` (LATENT samples, [B, C, H, W]) along the descending flow `sigmas`.

    positive / negative are CONDITIONING lists; Flux dev is guidance-distilled: invert with cfg 1
    (the negative is then not evaluated) and its guidance value in the conditioning. Sampling
    forward with Euler from `noise` over the same sigmas, prompt and cfg reconstructs the input
    up to the inverse Euler's discretisation error, which fixed_point_iterations reduce.
    controller γ in [0, 1]: RF-Inversion's controlled forward ODE towards the noise y₁ drawn from
    `seed` (standard normal, model space); 0 is plain inverse Euler. The paper evaluates the
    velocity at the current level; here it is the destination level's, as every StyleKit flow
    inversion step (D at σ = 0 carries no velocity).
    """
    if not 0.0 <= controller <= 1.0:
        raise ValueError(f"controller {controller} must lie in [0, 1]")
    check_flow_model(model_patcher)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2 or float(sigmas[-1]) != 0.0 or bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("sigmas must be a full descending schedule ending at 0")
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent_image)
    ascending = sigmas.flip(0)
    states: list[torch.Tensor] = []
    target = None
    if controller:
        target = torch.randn(latent_image.shape, generator=torch.Generator().manual_seed(seed % 2**64))
    sampler = comfy.samplers.KSAMPLER(sample_flow_inversion, extra_options={
        "trajectory": states, "fixed_point_iterations": fixed_point_iterations, "controller": controller,
        "target_noise": target})
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    bar = comfy.utils.ProgressBar(ascending.shape[0] - 1) if progress else None
    callback = None if bar is None else (lambda i, denoised, x, total: bar.update_absolute(i + 1, total))
    # Starting at sigma 0, core's noise scaling leaves the latent as it is: zero noise is never mixed in.
    guider.sample(torch.zeros_like(latent_image), latent_image, sampler, ascending, callback=callback,
                  disable_pbar=True, seed=seed)
    return FlowInversion(sigmas=sigmas.float().cpu(), states=torch.stack(states[::-1]).float(), cfg=float(cfg))
