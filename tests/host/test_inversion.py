"""DDIM inversion through core sampling: the algorithm, its reconstruction error, its outputs.

Parity: the official loop (google/style-aligned inversion.py `_ddim_loop` + `_next_step`, a
diffusers UNet on DDIM latents) is written out here on a diffusers twin of the SD1.5 fixture's
UNet and compared with `invert`. For the round trip, the random-weight fixtures define no smooth probability-flow ODE (their latents reach hundreds),
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
from stylekit.tests.support.diffusers_unet import diffusers_twin

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
    """Sample forward from the inverted latent with no added noise: what a user does next.

    The official loop treats the input as the latent at the level of ᾱ_0 (σ_min), and its DDIM
    sampler ends there too: the round trip is measured at that level (sampled on to σ = 0, the
    last Euler step adds σ_min·ε, about 1e-3 here)."""
    sampler = comfy.samplers.sampler_object("euler")
    sigma_min = float(model.get_model_object("model_sampling").sigma_min)
    sigmas = trajectory.sigmas.clone()
    sigmas[-1] = sigma_min
    x = comfy.sample.sample_custom(model, torch.zeros_like(trajectory.inverted), cfg, sampler, sigmas,
                                   *conds, trajectory.inverted, disable_pbar=True, seed=0)
    return x / (1 + sigma_min ** 2) ** 0.5


def official_alphas_cumprod() -> torch.Tensor:
    """SD's DDIMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear"), as the official notebooks."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def official_ddim_loop(eps, z0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The official inversion loop on DDIM latents: `eps(z, t)` is the (guided) noise prediction.

    Leading timesteps with steps_offset 1 (t = 1, 1 + 1000/steps, ...); the level below the first
    is final_alpha_cumprod = ᾱ_0 (set_alpha_to_one=False); the UNet sees z_{t−1} at timestep t.
    Returns [z0, z_1, ..., z_T] (the official list before its flip)."""
    ac = official_alphas_cumprod()
    stride = 1000 // steps
    z, out = z0, [z0]
    for t in range(1, 1000, stride):
        a_prev = ac[t - stride] if t - stride >= 0 else ac[0]
        a_t = ac[t]
        e = eps(z, t)
        x0 = (z - (1 - a_prev) ** 0.5 * e) / a_prev ** 0.5
        z = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * e
        out.append(z)
    return out


def l2_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_the_inverted_latent_is_the_official_loops_on_the_same_unet(sd15, cfg):
    import nodes

    steps = 10
    positive = encode(sd15.clip, "waves")
    negative = nodes.ConditioningZeroOut().zero_out(positive)[0]  # the official all-zero negative
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = schedule(sd15.model, "ddim_uniform", steps)
    trajectory = invert(sd15.model, latent, positive, negative, sigmas, cfg=cfg, progress=False)

    twin = diffusers_twin(sd15.model)
    context = torch.cat([negative[0][0], positive[0][0]]).float()

    def eps(z, t):
        with torch.no_grad():
            uncond, cond = twin(torch.cat([z, z]).float(), t, encoder_hidden_states=context).sample.double().chunk(2)
        return uncond + cfg * (cond - uncond)

    model = sd15.model.model
    z0 = model.process_latent_in(latent).double()
    official = official_ddim_loop(eps, z0, steps)
    ac = official_alphas_cumprod()
    levels = [ac[0]] + [ac[t] for t in range(1, 1000, 1000 // steps)]
    # Same schedule: ComfyUI's ddim_uniform sigmas are the official timesteps' σ = √((1−ᾱ)/ᾱ).
    official_sigmas = ((1 - torch.stack(levels[1:])) / torch.stack(levels[1:])) ** 0.5
    assert relative_error(sigmas[:-1].double().flip(0), official_sigmas) < 1e-5
    # Ours holds x = z/√ᾱ at each sigma (sampling order): the UNet sees z.
    ours = [model.process_latent_in(x).double() / (1 + float(s) ** 2) ** 0.5
            for x, s in zip(trajectory.latents, trajectory.sigmas)]
    assert l2_relative(ours[0], official[-1]) < 1e-3
    for j in range(1, steps):  # every intermediate latent too
        assert l2_relative(ours[j], official[steps - j]) < 1e-3


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


# ReNoise as InstantStyle-Plus runs it (instantX-research/InstantStyle-Plus, src/renoise_inversion.py
# with src/config.py and infer_style.py's RunConfig: 1 renoise step, guidance 0 (no CFG), noise
# regularisation λ_AC 20 / λ_KL 0.065, 4 rounds of 5 rolls, averaging ranges (0, 5) below t = 250
# and (8, 10) above, no noise correction), written out here independently.

def _official_auto_corr(x, generator):
    loss = 0.0
    for channel in range(x.shape[1]):
        n = x[0, channel][None, None]
        while True:
            roll = torch.randint(0, n.shape[2] // 2, (1,), generator=generator).item()
            loss = loss + (n * torch.roll(n, shifts=roll, dims=2)).mean() ** 2
            loss = loss + (n * torch.roll(n, shifts=roll, dims=3)).mean() ** 2
            if n.shape[2] <= 8:
                break
            n = torch.nn.functional.avg_pool2d(n, kernel_size=2)
    return loss


def _official_patch_kl(x0, x1):
    def patchify(t):
        return t.unfold(1, 4, 4).unfold(2, 4, 4).unfold(3, 4, 4).contiguous().view(-1, 4, 4, 4)
    a, b = patchify(x0).flatten(2), patchify(x1).flatten(2)
    mu0, mu1, var0, var1 = a.mean(-1), b.mean(-1), a.var(-1), b.var(-1)
    kl = torch.log((var1 + 1e-6) / (var0 + 1e-6)) + (var0 + (mu0 - mu1) ** 2) / (var1 + 1e-6) - 1
    return kl.abs().sum(-1).sum()


def _official_regularise(e, optimal, generator):
    for _ in range(4):
        var = e.detach().clone().requires_grad_(True)
        _official_patch_kl(var, optimal).backward()
        e = e - 0.065 * var.grad.detach().clip(-100, 100)
        for _ in range(5):
            var = e.detach().clone().requires_grad_(True)
            _official_auto_corr(var, generator).backward()
            e = e - 20.0 * var.grad.detach() / 5
        e = e.detach()
    return e


def official_renoise_inversion(eps, z0, steps, seed):
    ac = official_alphas_cumprod()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=generator).to(z0.dtype)
    stride = 1000 // steps
    z = z0
    for t in range(1, 1000, stride):
        a_prev = ac[t - stride] if t - stride >= 0 else ac[0]
        a_t = ac[t]

        def inv_step(e):
            return a_t ** 0.5 * (z - (1 - a_prev) ** 0.5 * e) / a_prev ** 0.5 + (1 - a_t) ** 0.5 * e

        avg_range, renoise = ((0, 5), min(5, 1)) if t < 250 else ((8, 10), 1)
        average, optimal, estimate = None, None, z
        z_forward = a_t ** 0.5 * z0 + (1 - a_t) ** 0.5 * noise
        for i in range(renoise + 1):
            if i == 0:
                optimal, e = eps(torch.cat([z_forward, estimate]), t).chunk(2)
            else:
                e = eps(estimate, t)
            if avg_range[0] <= i < avg_range[1]:
                j = i - avg_range[0]
                average = e.clone() if average is None else j * average / (j + 1) + e / (j + 1)
            if i >= avg_range[0]:
                regularised = _official_regularise(e, optimal, generator)
                if not torch.isnan(regularised).any():
                    e = regularised
            estimate = inv_step(e)
        if average is not None:
            estimate = inv_step(_official_regularise(average, optimal, generator))
        z = estimate
    return z


def test_renoise_inversion_is_instantstyle_plus_renoise_on_the_same_unet(sd15):
    steps, seed = 10, 7865
    positive = encode(sd15.clip, "waves")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = schedule(sd15.model, "ddim_uniform", steps)
    # Official guidance 0 means no CFG: the conditional prediction alone, ComfyUI's cfg 1.
    trajectory = invert(sd15.model, latent, positive, positive, sigmas, cfg=1.0, method="renoise", seed=seed,
                        progress=False)
    twin = diffusers_twin(sd15.model)
    context = positive[0][0].float()

    def eps(z, t):
        with torch.no_grad():
            return twin(z.float(), t, encoder_hidden_states=context.expand(z.shape[0], -1, -1)).sample.double()

    model = sd15.model.model
    official = official_renoise_inversion(eps, model.process_latent_in(latent).double(), steps, seed)
    ours = model.process_latent_in(trajectory.inverted).double() / (1 + float(sigmas[0]) ** 2) ** 0.5
    assert l2_relative(ours, official) < 1e-3
    # It is not plain DDIM inversion: the re-noising and the regulariser move the result.
    plain = invert(sd15.model, latent, positive, positive, sigmas, cfg=1.0, progress=False)
    assert l2_relative(model.process_latent_in(plain.inverted).double() / (1 + float(sigmas[0]) ** 2) ** 0.5,
                       official) > 1e-2
