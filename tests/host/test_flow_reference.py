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
from stylekit.sampling.flow_inversion import FlowInversion
from stylekit.tests.support.tiny_dits import tiny_flux, tiny_flux_conditioning

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
