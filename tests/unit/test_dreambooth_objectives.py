"""DreamBooth's objective (training/objectives.py) against formulas written here and diffusers."""
from __future__ import annotations

import pytest
import torch

from stylekit.training.loss_curve import loss_curve_image, moving_average
from stylekit.training.objectives import (PREDICTIONS, StepLoss, dreambooth_loss, noised, prediction_target,
                                          raw_prediction)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    return x0, noise, sigma


def test_eps_target_is_the_noise():
    x0, noise, sigma = _batch()
    assert torch.equal(prediction_target("eps", x0, noise, sigma), noise)


@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_a_perfect_denoiser_has_exactly_the_target_as_raw_output(kind, sigma_data):
    x0, noise, sigma = _batch()
    x0, noise, sigma = x0.double(), noise.double(), sigma.double()
    x_t = noised(x0, noise, sigma)
    assert torch.allclose(raw_prediction(kind, x0, x_t, sigma, sigma_data),
                          prediction_target(kind, x0, noise, sigma, sigma_data), atol=1e-9)


def test_v_target_matches_diffusers_velocity_on_the_sd_schedule():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="v_prediction")
    timesteps = torch.tensor([0, 250, 999])
    alphas_cumprod = scheduler.alphas_cumprod[timesteps].double()
    sigma = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # ComfyUI's sigma of a DDPM timestep
    x0, noise, _ = _batch(1)
    x0, noise = x0.double(), noise.double()
    expected = scheduler.get_velocity(x0, noise, timesteps)
    assert torch.allclose(prediction_target("v", x0, noise, sigma), expected, atol=1e-5)


def test_raw_prediction_undoes_comfy_style_denoising_for_an_arbitrary_output():
    # calculate_denoised as ComfyUI's EPS and V_PREDICTION write it, re-derived here.
    x0, out, sigma = _batch(2)
    x_t = x0
    s = sigma.view(-1, 1, 1, 1)
    eps_denoised = x_t - out * s
    v_denoised = x_t / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
    assert torch.allclose(raw_prediction("eps", eps_denoised, x_t, sigma), out, atol=1e-4)
    assert torch.allclose(raw_prediction("v", v_denoised, x_t, sigma), out, atol=1e-4)


def test_unknown_prediction_type_is_refused():
    x0, noise, sigma = _batch()
    with pytest.raises(ValueError, match="unknown prediction type"):
        prediction_target("flow", x0, noise, sigma)


def test_dreambooth_loss_is_subject_mse_plus_lambda_times_prior_mse():
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float16) for _ in range(4))
    subject_mse = ((a.double() - b.double()) ** 2).mean()
    prior_mse = ((c.double() - d.double()) ** 2).mean()
    for weight in (0.0, 1.0, 2.5):
        total, subject, prior = dreambooth_loss(a, b, c, d, weight)
        assert total.dtype == torch.float32
        assert torch.isclose(subject.double(), subject_mse, rtol=1e-6)
        assert torch.isclose(prior.double(), prior_mse, rtol=1e-6)
        assert torch.isclose(total.double(), subject_mse + weight * prior_mse, rtol=1e-6)


def test_without_a_prior_batch_the_loss_is_the_subject_term_alone():
    a, b = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    total, subject, prior = dreambooth_loss(a, b, prior_weight=3.0)
    assert total.item() == subject.item() == 1.0 and prior.item() == 0.0
    assert StepLoss(1.0, 0.5, 2.0).total == 2.0


def test_moving_average_of_a_constant_is_that_constant():
    assert moving_average([2.0] * 5) == pytest.approx([2.0] * 5)


def test_loss_curve_is_an_rgb_image_in_unit_range_even_for_flat_or_broken_losses():
    for subject, prior in (([1.0, 0.8, 0.7], [0.9, 0.9, 1.0]), ([0.5] * 3, None), ([float("nan"), 1.0], None)):
        image = loss_curve_image(subject, prior)
        assert image.shape == (1, 360, 640, 3) and 0.0 <= image.min() and image.max() <= 1.0
