"""Flow inversion through core sampling: the algorithm, its round trip, what a replay hands the model.

As the DDIM inversion tests do, the algorithm is checked on an analytic flow in place of the
network (Gaussian data x0 ~ N(μ, s²) per element, x_σ = (1 − σ)x0 + σ·n, so the exact denoiser is
D(x, σ) = μ + (1 − σ)s²/((1 − σ)²s² + σ²)·(x − (1 − σ)μ)), set through core's
model_function_wrapper on a tiny core-class Flux; CFGGuider, KSAMPLER, Flux's latent format and
model sampling are ComfyUI's own. The tiny Flux itself then runs the inversion unpatched.
"""
from __future__ import annotations

import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import pytest
import torch

from stylekit.sampling.flow_inversion import FlowInversion, invert_flow
from stylekit.tests.support.tiny_dits import tiny_flux, tiny_flux_conditioning

MU, S = 0.3, 0.8


def exact_denoiser(x, sigma):
    return MU + (1 - sigma) * S * S / ((1 - sigma) ** 2 * S * S + sigma * sigma) * (x - (1 - sigma) * MU)


def gaussian_flow(apply_model, args):
    return exact_denoiser(args["input"], args["timestep"].view(-1, 1, 1, 1))


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


@pytest.fixture
def analytic(flux):
    m = flux.clone()
    m.set_model_unet_function_wrapper(gaussian_flow)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(1, 16, 8, 8, generator=g)  # data from the flow's Gaussian, model space
    latent = flux.model.process_latent_out(x0)
    conds = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    return m, latent, conds


def schedule(model, steps, scheduler="simple"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def relative_error(x, reference):
    return ((x.double() - reference.double()).norm() / reference.double().norm()).item()


def forward(model, inversion: FlowInversion, conds, cfg=1.0):
    """Euler from the inverted state over the same sigmas, no latent mixed in: what a user does next."""
    sampler = comfy.samplers.sampler_object("euler")
    shape = inversion.noise.shape
    return comfy.sample.sample_custom(model, inversion.noise, cfg, sampler, inversion.sigmas, *conds,
                                      torch.zeros(shape), disable_pbar=True, seed=0)


def test_the_trajectory_is_inverse_euler_step_by_step(analytic):
    # Written out here in fp64: x_{i+1} = x_i + v·(σ_{i+1} − σ_i), v = (x_i − D(x_i, σ_{i+1}))/σ_{i+1}.
    m, latent, conds = analytic
    sigmas = schedule(m, 12)
    inversion = invert_flow(m, latent, *conds, sigmas, progress=False)
    up = sigmas.double().flip(0)
    x = m.model.process_latent_in(latent).double()
    want = [x]
    for i in range(len(up) - 1):
        x = x + (x - exact_denoiser(x, up[i + 1])) / up[i + 1] * (up[i + 1] - up[i])
        want.append(x)
    want = torch.stack(want[::-1])
    assert inversion.states.shape == (13, 1, 16, 8, 8) and inversion.states.device.type == "cpu"
    assert float(inversion.sigmas[0]) == 1.0 and torch.equal(inversion.sigmas, sigmas.float())
    assert torch.equal(inversion.states[-1], m.model.process_latent_in(latent))
    assert relative_error(inversion.states, want) < 1e-5


def test_sampling_forward_from_the_inverted_state_reconstructs_the_input(analytic):
    m, latent, conds = analytic
    errors = {}
    for steps, iterations in [(10, 0), (50, 0), (50, 1), (50, 3)]:
        inversion = invert_flow(m, latent, *conds, schedule(m, steps), fixed_point_iterations=iterations, progress=False)
        errors[steps, iterations] = relative_error(forward(m, inversion, conds), latent)
    # Inverse Euler has a first-order error that shrinks with the steps; fixed-point iterations
    # solve the implicit step and make the round trip exact to a few 1e-4 or better.
    assert errors[50, 0] < errors[10, 0] / 2
    assert errors[50, 3] < errors[50, 1] < errors[50, 0]
    assert errors[50, 3] < 1e-3


def test_sd3_discrete_flow_sampling_inverts_as_well(analytic):
    # SD3/3.5 sample with ModelSamplingDiscreteFlow (shift 3, timestep = sigma·1000): same ODE in sigma.
    m, latent, conds = analytic
    m = m.clone()

    class DiscreteFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = DiscreteFlow()
    sampling.set_parameters(shift=3.0)
    m.add_object_patch("model_sampling", sampling)
    sigmas = schedule(m, 50)
    assert float(sigmas[0]) == pytest.approx(1.0) and float(sigmas[1]) > 0.99  # shift 3 crowds the top
    plain = invert_flow(m, latent, *conds, sigmas, progress=False)
    refined = invert_flow(m, latent, *conds, sigmas, fixed_point_iterations=3, progress=False)
    assert relative_error(forward(m, refined, conds), latent) < relative_error(forward(m, plain, conds), latent) / 10


def test_a_replayed_state_reaches_the_model_bit_for_bit(analytic):
    # Replay the trajectory as a reference row would: row 0 of the batch is set to state_at(sigma)
    # before the model call; core then hands the diffusion model exactly that tensor.
    m, latent, conds = analytic
    inversion = invert_flow(m, latent, *conds, schedule(m, 6), progress=False)
    seen = []

    def replay(apply_model, args):
        x = args["input"].clone()
        x[0] = inversion.state_at(float(args["timestep"][0]))[0].to(x)
        return apply_model(x, args["timestep"], **args["c"])

    def record(executor, x, *args, **kwargs):
        seen.append((float(args[0][0]), x[0].clone()))
        return executor(x, *args, **kwargs)

    replayed = m.clone()
    replayed.set_model_unet_function_wrapper(replay)
    replayed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "record", record)
    comfy.sample.sample_custom(replayed, torch.randn(2, 16, 8, 8), 1.0, comfy.samplers.sampler_object("euler"),
                               inversion.sigmas, *conds, torch.zeros(2, 16, 8, 8), disable_pbar=True, seed=0)
    assert len(seen) == inversion.steps
    for j, (timestep, x) in enumerate(seen):
        assert timestep == pytest.approx(float(inversion.sigmas[j]))  # Flux's timestep is sigma
        assert torch.equal(x, inversion.states[j][0])


def test_state_at_interpolates_between_schedule_points_linearly():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    states = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 1, 2, 2, 2).clone()
    inversion = FlowInversion(sigmas, states, 1.0)
    assert torch.equal(inversion.state_at(0.5), states[1])
    assert torch.allclose(inversion.state_at(0.75), torch.full((1, 2, 2, 2), 0.5))
    assert torch.equal(inversion.state_at(2.0), states[0]) and torch.equal(inversion.state_at(0.0), states[2])


def test_the_real_tiny_flux_inverts_through_a_model_patcher_deterministically_with_progress(flux, monkeypatch):
    conds = tiny_flux_conditioning(3), tiny_flux_conditioning(4)
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: updates.append((value, total)))
    calls = []
    m = flux.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count",
                           lambda executor, x, *a, **k: calls.append(x.shape[0]) or executor(x, *a, **k))
    first = invert_flow(m, latent, *conds, schedule(m, 4), cfg=2.0)
    second = invert_flow(m, latent, *conds, schedule(m, 4), cfg=2.0, progress=False)
    assert torch.equal(first.states, second.states) and first.states.shape == (5, 2, 16, 8, 8)
    assert torch.isfinite(first.states).all() and not torch.equal(first.noise, first.states[-1])
    # Progress climbs to the last step; 0.3.75 reports every step, core 0.33 throttles (1, 4), (4, 4).
    steps = [value for value, total in updates if total == 4]
    assert steps and steps == sorted(steps) and steps[-1] == 4 and set(steps) <= {1, 2, 3, 4}
    assert len(calls) >= 8  # the network ran at every step, cond and uncond (cfg 2)
    back = forward(flux, first, conds, cfg=2.0)
    assert back.shape == latent.shape and torch.isfinite(back).all()


def test_refinement_also_reduces_the_round_trip_error_on_the_tiny_flux(flux):
    # Random weights define no smooth flow, yet the implicit step is what undoes Euler: measured
    # 0.77 plain vs 0.17 with 3 iterations at 10 steps (0.28 vs 0.004 at 30).
    conds = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigmas = schedule(flux, 10)
    plain = invert_flow(flux, latent, *conds, sigmas, progress=False)
    refined = invert_flow(flux, latent, *conds, sigmas, fixed_point_iterations=3, progress=False)
    assert relative_error(forward(flux, refined, conds), latent) < relative_error(forward(flux, plain, conds), latent) / 3


def test_models_that_are_not_flows_are_refused(flux):
    m = flux.clone()

    class Eps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    m.add_object_patch("model_sampling", Eps())
    with pytest.raises(ValueError, match="needs a rectified-flow model"):
        invert_flow(m, torch.zeros(1, 16, 8, 8), [], [], torch.tensor([1.0, 0.0]), progress=False)


def test_a_schedule_that_does_not_end_at_zero_is_refused(flux):
    with pytest.raises(ValueError, match="full descending schedule"):
        invert_flow(flux, torch.zeros(1, 16, 8, 8), [], [], torch.tensor([1.0, 0.5]), progress=False)


# RF-Inversion's controlled variant (Rout et al. 2024, Algorithm 1): the inverse Euler velocity v
# steered towards the straight path to a fixed noise y₁, v̂ = v + γ·((y₁ − x)/(1 − σ) − v).
def seeded_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_the_controlled_inversion_is_rf_inversions_step_written_out(analytic):
    m, latent, conds = analytic
    sigmas = schedule(m, 10)
    inversion = invert_flow(m, latent, *conds, sigmas, progress=False, controller=0.6, seed=11)
    y1 = seeded_noise(latent.shape, 11).double()
    up = sigmas.double().flip(0)
    x = m.model.process_latent_in(latent).double()
    want = [x]
    for i in range(len(up) - 1):
        v = (x - exact_denoiser(x, up[i + 1])) / up[i + 1]
        u = (y1 - x) / (1 - up[i])
        x = x + (v + 0.6 * (u - v)) * (up[i + 1] - up[i])
        want.append(x)
    assert relative_error(inversion.states, torch.stack(want[::-1])) < 1e-5


def test_controller_zero_is_plain_inversion_and_one_lands_on_the_seeded_noise(analytic):
    m, latent, conds = analytic
    sigmas = schedule(m, 6)
    plain = invert_flow(m, latent, *conds, sigmas, progress=False)
    assert torch.equal(invert_flow(m, latent, *conds, sigmas, progress=False, controller=0.0, seed=3).states,
                       plain.states)
    full = invert_flow(m, latent, *conds, sigmas, progress=False, controller=1.0, seed=3)
    assert relative_error(full.noise, seeded_noise(latent.shape, 3)) < 1e-6
    # The controller pulls the inverted state towards y₁: closer than plain inversion gets.
    half = invert_flow(m, latent, *conds, sigmas, progress=False, controller=0.5, seed=3)
    y1 = seeded_noise(latent.shape, 3)
    assert relative_error(half.noise, y1) < relative_error(plain.noise, y1)
    with pytest.raises(ValueError, match="controller 1.5 must lie in"):
        invert_flow(m, latent, *conds, sigmas, progress=False, controller=1.5)


def test_the_inversion_node_runs_the_controlled_variant_on_flows_and_refuses_it_elsewhere(flux):
    from stylekit.nodes.inversion import StyleKitDDIMInversion

    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))}
    conds = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    run = lambda model, controller: StyleKitDDIMInversion.execute(model, *conds, latent, 3, 1.0, "simple", 0,
                                                                  "ddim", 5, controller).result[1]
    y1 = seeded_noise((1, 16, 8, 8), 5)
    full = run(flux, 1.0)
    assert relative_error(full.noise, y1) < 1e-6
    assert not torch.equal(run(flux, 0.3).states, run(flux, 0.0).states)

    class Eps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    unet_like = flux.clone()
    unet_like.add_object_patch("model_sampling", Eps())
    with pytest.raises(ValueError, match="StyleKit DDIM Inversion: input 'controller'"):
        run(unet_like, 0.5)
