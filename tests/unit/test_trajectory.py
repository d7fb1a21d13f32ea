"""Which trajectory state the reference row gets at each step (official rule), and between steps."""
from __future__ import annotations

import pytest
import torch

from stylekit.host.trajectory import InversionTrajectory, pinned_index, reference_latent, step_position


def official_schedule(steps: int, offset: int) -> list[int]:
    """What the official callback feeds row 0 at each step: zts[offset] first, then after step i
    it writes zts[max(offset + 1, i + 1)] for step i + 1 (inversion.make_inversion_callback)."""
    fed = [offset]
    for i in range(steps - 1):
        fed.append(max(offset + 1, i + 1))
    return fed


@pytest.mark.parametrize("offset", [0, 1, 5])
def test_pinning_follows_the_official_callback(offset):
    steps = 50
    assert [pinned_index(j, offset, steps) for j in range(steps)] == official_schedule(steps, offset)


def test_an_offset_past_the_end_stays_on_the_clean_latent():
    assert pinned_index(3, 10, 4) == 4


def test_step_position_finds_schedule_points_and_points_between_them():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    assert step_position(sigmas, 10.0) == (0, 0.0)
    assert step_position(sigmas, 5.0000001) == (1, 0.0)
    assert step_position(sigmas, 3.0) == (1, 0.5)
    assert step_position(sigmas, 20.0) == (0, 0.0)
    assert step_position(sigmas, 0.0) == (3, 0.0)


def test_the_model_sees_the_official_latent_while_pinned_and_the_path_between_points():
    # ComfyUI's model input is x/√(1+σ²); the official UNet input is the DDIM latent zts[k] itself.
    sigmas = torch.tensor([8.0, 6.0, 4.0, 2.0, 0.0])
    latents = torch.randn(5, 1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    z = latents / (1 + sigmas.view(5, 1, 1, 1, 1) ** 2).sqrt()
    model_input = lambda sigma, offset: reference_latent(latents, sigmas, sigma, offset) / (1 + sigma ** 2) ** 0.5
    for offset in (0, 1, 2):
        for step, k in enumerate(official_schedule(4, offset)):
            assert torch.allclose(model_input(float(sigmas[step]), offset), z[k], atol=1e-6)
    assert torch.allclose(model_input(5.0, 1), z[2], atol=1e-6)      # pinned step between points: still zts[2]
    half = reference_latent(latents, sigmas, 3.0, 1)                 # free step: halfway along the path
    assert torch.allclose(half, (latents[2] + latents[3]) / 2, atol=1e-6)
    assert torch.allclose(reference_latent(latents, sigmas, 7.0, 0), (latents[0] + latents[1]) / 2, atol=1e-6)


def test_a_trajectory_needs_one_latent_per_sigma():
    with pytest.raises(ValueError, match="3 latents for 4 sigmas"):
        InversionTrajectory(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.zeros(3, 1, 4, 2, 2), 1.0)
    t = InversionTrajectory(torch.tensor([2.0, 0.0]), torch.stack([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)]), 2.0)
    assert t.steps == 1 and torch.equal(t.inverted, torch.ones(1, 4, 2, 2))
