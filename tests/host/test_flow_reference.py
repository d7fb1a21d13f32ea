"""Real references on flows: StyleKit DDIM Inversion inverts a Flux latent by inverse Euler
(sampling/flow_inversion.py) and StyleKit StyleAligned Reference Sampler replays it as the
reference row with DiT StyleAligned installed: the model's input for the reference row at every
step is the inversion's state at that sigma, bit for bit (tiny core-class Flux, CPU)."""
from __future__ import annotations

import comfy.patcher_extension
import pytest
import torch

from stylekit.nodes.inversion import StyleKitDDIMInversion
from stylekit.nodes.style_aligned import StyleKitStyleAlignedReferenceSampler
from stylekit.nodes.visual_style_prompting import (StyleKitVisualStylePrompting,
                                                   StyleKitVisualStylePromptingReferenceSampler)
from stylekit.sampling.flow_inversion import FlowInversion
from stylekit.tests.support.tiny_dits import dit_conditioning, tiny_flux, tiny_flux_conditioning, tiny_mmdit

SIDE = 8


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=3)


def recording(model):
    m = model.clone()
    seen = []

    def wrapper(executor, x, timesteps, context, y, *args, **kwargs):
        seen.append((x[0].detach().clone(), float(timesteps.flatten()[0])))
        return executor(x, timesteps, context, y, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_recorder", wrapper)
    return m, seen


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_the_replayed_reference_is_the_inversions_state_at_each_sigma(flux, cfg):
    latent = {"samples": torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(0))}
    positive, negative = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    inverted, inversion = StyleKitDDIMInversion.execute(flux, positive, negative, latent, 4, cfg, "simple", 0).result
    assert isinstance(inversion, FlowInversion) and inversion.steps == 4
    assert torch.equal(inverted["samples"], flux.model.process_latent_out(inversion.noise))

    model, seen = recording(flux)
    out = StyleKitStyleAlignedReferenceSampler.execute(
        model, tiny_flux_conditioning(4), negative, positive, {"samples": torch.zeros(2, 16, SIDE, SIDE)}, inversion,
        0, cfg, "euler", 5, 0.0, 1.0, True, "custom", "").result[0]["samples"]
    assert out.shape == (2, 16, SIDE, SIDE) and torch.isfinite(out).all()
    assert len(seen) == 4  # one call per step (cond and uncond batched at cfg 2)
    for x, sigma in seen:
        assert torch.equal(x, inversion.state_at(sigma)[0]), sigma
    assert [s for _, s in seen] == pytest.approx(inversion.sigmas[:-1].tolist())


def test_the_sampler_refuses_a_unet_trajectory_on_a_flow_model(flux):
    from stylekit.host.trajectory import InversionTrajectory  # noqa: F401  (the UNet type)

    with pytest.raises(ValueError, match="input 'trajectory'"):
        StyleKitStyleAlignedReferenceSampler.execute(
            flux, tiny_flux_conditioning(1), tiny_flux_conditioning(2), tiny_flux_conditioning(1),
            {"samples": torch.zeros(1, 16, SIDE, SIDE)}, object(), 0, 1.0, "euler", 5, 0.0, 1.0, True, "custom", "")


# Visual Style Prompting's reference sampler on DiTs: the same replay, and the reference image
# noised along the flow, on Flux and SD3.5 (tiny core MMDiT).
@pytest.fixture(scope="module")
def sd35():
    return tiny_mmdit(seed=4, depth=2)


def recording_input(model):
    """Records row 0 of the model's input as apply_model computes it (calculate_input of the sampler's x)."""
    m = model.clone()
    seen = []

    def wrapper(executor, x, t, *args, **kwargs):
        seen.append((m.model.model_sampling.calculate_input(t, x)[0].detach().clone(), float(t.flatten()[0])))
        return executor(x, t, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_recorder", wrapper)
    return m, seen


def vsp_sample(model, positive, negative, reference_positive, latent, cfg=1.0, steps=4, color_calibration=False,
               **reference):
    return StyleKitVisualStylePromptingReferenceSampler.execute(
        model, positive, negative, reference_positive, latent, 3, steps, cfg, "euler", "simple", color_calibration,
        0.0, 1.0, "custom", "", **reference).result[0]["samples"]


@pytest.mark.parametrize("family,cfg", [("flux", 1.0), ("flux", 2.0), ("sd35", 3.0)])
def test_the_vsp_sampler_replays_the_flow_inversion_as_the_reference_row(flux, sd35, family, cfg):
    base = flux if family == "flux" else sd35
    cond = lambda seed: dit_conditioning(base, seed=seed)
    latent = {"samples": torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))}
    _, inversion = StyleKitDDIMInversion.execute(base, cond(1), cond(2), latent, 4, cfg, "simple", 0).result
    model, seen = recording_input(base)
    out = vsp_sample(model, cond(4), cond(2), cond(1), {"samples": torch.zeros(2, 16, SIDE, SIDE)}, cfg,
                     trajectory=inversion)
    assert out.shape == (2, 16, SIDE, SIDE) and torch.isfinite(out).all()
    assert len(seen) == 4
    for x, sigma in seen:
        assert torch.equal(x, inversion.state_at(sigma)[0]), sigma
    assert [s for _, s in seen] == pytest.approx(inversion.sigmas[:-1].tolist())
    # The swap acts: the same reference row on the unpatched model gives other images.
    from stylekit.sampling.flow_reference import FlowTrajectoryReference
    from stylekit.sampling.reference import sample_with_reference

    unswapped = sample_with_reference(base, FlowTrajectoryReference(inversion), cond(4), cond(2), cond(1),
                                      torch.zeros(2, 16, SIDE, SIDE), inversion.sigmas, 3, cfg, "euler")
    assert (unswapped - out).abs().max() > 1e-3 * out.abs().max()
    assert install_count(base) == 0


def install_count(model) -> int:
    """Patches left on the input model (the sampler works on clones)."""
    return len(model.model_options.get("transformer_options", {}).get("patches_replace", {}))


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_the_vsp_sampler_noises_a_reference_latent_along_the_flow(flux, sd35, family):
    # Row 0 at sigma σ of step i: (1 − σ)·z0 + σ·ε_i, ε_i drawn from seed + 1 + i (fresh noise per step).
    base = flux if family == "flux" else sd35
    cond = lambda seed: dit_conditioning(base, seed=seed)
    z0 = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(6))
    model, seen = recording_input(base)
    vsp_sample(model, cond(4), cond(2), cond(1), {"samples": torch.zeros(2, 16, SIDE, SIDE)},
               reference_latent={"samples": z0})
    assert len(seen) == 4
    z = base.model.process_latent_in(z0)
    for i, (x, sigma) in enumerate(seen):
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(3 + 1 + i))
        torch.testing.assert_close(x, ((1 - sigma) * z + sigma * eps)[0], atol=1e-6, rtol=0)


def test_the_flow_colour_calibration_keeps_the_predicted_noise():
    # An Euler step with the returned denoised output lands on (1 − σ')·x0_cal + σ'·ε̂, where
    # ε̂ = (x − (1 − σ)·D)/σ is the noise the model predicted (x = (1 − σ)·x0 + σ·ε).
    from stylekit.sampling.reference import calibrated_denoised_flow

    g = torch.Generator().manual_seed(7)
    x, d, cal = (torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma, sigma_next = 0.7, 0.55
    d_out = calibrated_denoised_flow(x, d, cal, sigma, sigma_next)
    euler = x + (x - d_out) / sigma * (sigma_next - sigma)
    eps = (x - (1 - sigma) * d) / sigma
    torch.testing.assert_close(euler, (1 - sigma_next) * cal + sigma_next * eps, atol=1e-12, rtol=0)
    torch.testing.assert_close(calibrated_denoised_flow(x, d, d, sigma, sigma_next), d, atol=1e-12, rtol=0)


def test_vsp_sampler_errors_name_their_input(flux):
    cond = tiny_flux_conditioning
    latent = {"samples": torch.zeros(1, 16, SIDE, SIDE)}
    name = "StyleKit Visual Style Prompting Reference Sampler"
    from stylekit.host.trajectory import InversionTrajectory

    unet_trajectory = InversionTrajectory.__new__(InversionTrajectory)
    with pytest.raises(ValueError, match=f"{name}: input 'trajectory': .*DDIM inversion"):
        vsp_sample(flux, cond(1), cond(2), cond(1), latent, trajectory=unet_trajectory)
    with pytest.raises(ValueError, match=f"{name}: input 'latent_image': its latent is"):
        vsp_sample(flux, cond(1), cond(2), cond(1), {"samples": torch.zeros(1, 16, 2 * SIDE, SIDE)},
                   reference_latent={"samples": torch.zeros(1, 16, SIDE, SIDE)})
    with pytest.raises(ValueError, match=f"{name}: input 'reference_latent': .*single reference image"):
        vsp_sample(flux, cond(1), cond(2), cond(1), latent, reference_latent={"samples": torch.zeros(2, 16, SIDE, SIDE)})
    with pytest.raises(ValueError, match=f"{name}: input 'positive': it has a batch of 3 prompts for 2"):
        vsp_sample(flux, tiny_dits_batch(3), cond(2), cond(1), {"samples": torch.zeros(2, 16, SIDE, SIDE)},
                   reference_latent={"samples": torch.zeros(1, 16, SIDE, SIDE)})
    swapped = StyleKitVisualStylePrompting.execute(flux, "custom", "", 0.0, 1.0, 0.0, 3).result[0]
    with pytest.raises(ValueError, match=f"{name}: input 'model': the model already has Visual Style Prompting"):
        vsp_sample(swapped, cond(1), cond(2), cond(1), latent, reference_latent=latent)


def tiny_dits_batch(rows):
    context, extra = tiny_flux_conditioning(9)[0]
    return [[context.repeat(rows, 1, 1), {**extra, "pooled_output": extra["pooled_output"].repeat(rows, 1)}]]


def test_style_aligned_sampler_errors_name_their_input(flux):
    name = "StyleKit StyleAligned Reference Sampler"
    latent = {"samples": torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(0))}
    positive, negative = tiny_flux_conditioning(1), tiny_flux_conditioning(2)
    _, inversion = StyleKitDDIMInversion.execute(flux, positive, negative, latent, 2, 1.0, "simple", 0).result
    run = lambda model, lat, pos=positive: StyleKitStyleAlignedReferenceSampler.execute(
        model, pos, negative, positive, lat, inversion, 0, 1.0, "euler", 5, 0.0, 1.0, True, "custom", "")
    with pytest.raises(ValueError, match=f"{name}: input 'latent_image': its latent is"):
        run(flux, {"samples": torch.zeros(1, 16, 2 * SIDE, SIDE)})
    with pytest.raises(ValueError, match=f"{name}: input 'positive': it has a batch of 3 prompts for 2"):
        run(flux, {"samples": torch.zeros(2, 16, SIDE, SIDE)}, tiny_dits_batch(3))
