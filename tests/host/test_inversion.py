"""DDIM inversion through core sampling: the algorithm, its reconstruction error, its outputs.

The random-weight fixtures define no smooth probability-flow ODE (their latents reach hundreds),
so the algorithm is checked on the real host with an analytic denoiser in place of the UNet
(Gaussian data, D(x, σ) = μ + s²/(s² + σ²)·(x − μ), set through core's model_function_wrapper):
everything else — CFGGuider, KSAMPLER, conditioning, latent scaling — is ComfyUI's own.
"""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import pytest
import torch

from stylekit.sampling.inversion import invert, schedule
from stylekit.tests.host.sharing_support import encode, relative_error

MU, S = 0.3, 0.8


def gaussian_denoiser(apply_model, args):
    x, sigma = args["input"], args["timestep"].view(-1, 1, 1, 1)
    return MU + S * S / (S * S + sigma * sigma) * (x - MU)


@pytest.fixture
def gaussian(sd15):
    m = sd15.model.clone()
    m.set_model_unet_function_wrapper(gaussian_denoiser)
    scale = sd15.model.model.latent_format.scale_factor
    g = torch.Generator().manual_seed(0)
    latent = (MU + S * torch.randn(1, 4, 8, 8, generator=g)) / scale  # data drawn from the model's Gaussian
    conds = encode(sd15.clip, "waves"), encode(sd15.clip, "")
    return m, latent, conds, scale


def forward(model, trajectory, conds, cfg=1.0):
    """Sample forward from the inverted latent with no added noise: what a user does next."""
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model, torch.zeros_like(trajectory.inverted), cfg, sampler, trajectory.sigmas,
                                      *conds, trajectory.inverted, disable_pbar=True, seed=0)


def test_the_trajectory_is_ddim_inversion_step_by_step(gaussian):
    # Written out here in fp64: x_{i+1} = x_i + ε(x_i, σ_{i+1})·(σ_{i+1} − σ_i), ε = (x − D(x, σ))/σ.
    m, latent, conds, scale = gaussian
    sigmas = schedule(m, "ddim_uniform", 12)
    trajectory = invert(m, latent, *conds, sigmas, cfg=1.0, progress=False)
    up = sigmas.double().flip(0)
    x = latent.double() * scale
    want = [x]
    for i in range(len(up) - 1):
        denoised = MU + S * S / (S * S + up[i + 1] ** 2) * (x - MU)
        x = x + (x - denoised) / up[i + 1] * (up[i + 1] - up[i])
        want.append(x)
    want = torch.stack(want[::-1]) / scale
    assert trajectory.latents.shape == (len(sigmas), 1, 4, 8, 8)
    assert torch.equal(trajectory.latents[-1], latent) and torch.equal(trajectory.sigmas, sigmas)
    assert relative_error(trajectory.latents.double(), want) < 1e-5


def test_sampling_forward_from_the_inverted_latent_reconstructs_the_input(gaussian):
    m, latent, conds, _ = gaussian
    errors = {}
    for steps, iterations in [(10, 0), (50, 0), (50, 1), (50, 3)]:
        trajectory = invert(m, latent, *conds, schedule(m, "ddim_uniform", steps), cfg=1.0,
                            fixed_point_iterations=iterations, progress=False)
        errors[steps, iterations] = relative_error(forward(m, trajectory, conds), latent)
    # Plain DDIM inversion has a first-order error that shrinks with the steps; fixed-point
    # refinement solves the implicit step and makes the round trip exact to a few 1e-4.
    assert errors[50, 0] < errors[10, 0] / 2
    assert errors[50, 3] < errors[50, 1] < errors[50, 0]
    assert errors[50, 3] < 1e-3


def test_refinement_also_reduces_the_round_trip_error_on_the_real_fixture(sd15):
    conds = encode(sd15.clip, "waves"), encode(sd15.clip, "")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = schedule(sd15.model, "ddim_uniform", 10)
    plain = invert(sd15.model, latent, *conds, sigmas, cfg=1.0, progress=False)
    refined = invert(sd15.model, latent, *conds, sigmas, cfg=1.0, fixed_point_iterations=3, progress=False)
    plain_error = relative_error(forward(sd15.model, plain, conds), latent)
    refined_error = relative_error(forward(sd15.model, refined, conds), latent)
    assert refined_error < plain_error / 3


def test_it_is_deterministic_and_reports_progress_per_step(sd15, monkeypatch):
    conds = encode(sd15.clip, "waves"), encode(sd15.clip, "")
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: updates.append((value, total)))
    first = invert(sd15.model, latent, *conds, schedule(sd15.model, "ddim_uniform", 4), cfg=2.0)
    second = invert(sd15.model, latent, *conds, schedule(sd15.model, "ddim_uniform", 4), cfg=2.0)
    assert torch.equal(first.latents, second.latents) and first.latents.shape[:2] == (5, 2)
    assert updates[:4] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_models_without_a_noise_to_data_ode_of_this_form_are_refused(sd15):
    import comfy.model_sampling

    m = sd15.model.clone()

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    m.add_object_patch("model_sampling", Flow(sd15.model.model.model_config))
    with pytest.raises(ValueError, match="ε- and v-prediction"):
        invert(m, torch.zeros(1, 4, 8, 8), [], [], torch.tensor([1.0, 0.0]), progress=False)
