"""Sampling with a reference row: what row 0 holds at every model call, and that the other rows
are exactly KSampler's rows when nothing is shared."""
from __future__ import annotations

import math

import comfy.patcher_extension
import comfy.sample
import pytest
import torch

from stylekit.attention.adain import match_channel_stats
from stylekit.host.batch import chunks
from stylekit.host.layer_select import ALL, resolve_blocks
from stylekit.host.schedule import SigmaWindow
from stylekit.patching.style_aligned import StyleAlignedSettings, install_style_aligned
from stylekit.sampling.conditioning import InputError, encode_lines
from stylekit.sampling.inversion import invert, schedule
from stylekit.sampling.reference import (NoisedReference, ReferenceRowGuider,
                                         TrajectoryReference, sample_with_reference)
from stylekit.host.trajectory import reference_latent
from stylekit.tests.host.sharing_support import cond_and_uncond_apart, encode, relative_error, sample

TOLERANCE = 1e-5


def recording_rows(model):
    """A clone recording (sigma, first row of every cond/uncond chunk) at every apply_model call."""
    m = model.clone()
    calls = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs):
        per_chunk = [x[c.rows][0].clone() for c in chunks(transformer_options, x.shape[0])]
        calls.append((float(t[0]), per_chunk))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_rows", wrapper)
    m.calls = calls
    return m


@pytest.fixture
def setup(sd15):
    positive, negative = encode(sd15.clip, "a red barn"), encode(sd15.clip, "")
    reference_positive = encode(sd15.clip, "waves, abstract painting")
    reference = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    trajectory = invert(sd15.model, reference, reference_positive, negative,
                        schedule(sd15.model, "ddim_uniform", 8), cfg=2.0, progress=False)
    return sd15, positive, negative, reference_positive, reference, trajectory


def recording_unet_inputs(model):
    """A clone recording (sigma, the UNet's input x/√(1+σ²) for the first row of every chunk)."""
    m = model.clone()
    calls = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs):
        sigma = t.view(-1, 1, 1, 1)
        unet_input = m.model.model_sampling.calculate_input(sigma, x)
        calls.append((float(t[0]), [unet_input[c.rows][0].clone() for c in chunks(transformer_options, x.shape[0])]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_unet_inputs", wrapper)
    m.calls = calls
    return m


@pytest.mark.parametrize("offset", [2, 5])
def test_row_zero_gets_the_official_latents_as_unet_input(setup, offset):
    # Official (make_inversion_callback): row 0 starts at zts[offset]; after step i it is set to
    # zts[max(offset + 1, i + 1)]; the UNet sees that DDIM latent as it is at the step's timestep.
    sd15, positive, negative, reference_positive, _, trajectory = setup
    m = recording_unet_inputs(sd15.model)
    sample_with_reference(m, TrajectoryReference(trajectory, offset=offset), positive, negative, reference_positive,
                          torch.zeros(2, 4, 8, 8), trajectory.sigmas, seed=1, cfg=10.0, sampler_name="euler")
    process_in = sd15.model.model.process_latent_in
    zts = [process_in(x) / (1 + float(s) ** 2) ** 0.5 for x, s in zip(trajectory.latents, trajectory.sigmas)]
    fed = [offset] + [max(offset + 1, i + 1) for i in range(trajectory.steps - 1)]
    assert len(m.calls) == trajectory.steps
    for step, (sigma, rows) in enumerate(m.calls):
        assert sigma == pytest.approx(float(trajectory.sigmas[step]), rel=1e-5)
        want = zts[min(fed[step], trajectory.steps)][0]
        assert len(rows) == 2 and all(torch.allclose(r, want, atol=1e-5) for r in rows)


def test_between_schedule_points_multistage_samplers_get_the_interpolated_path(setup):
    sd15, positive, negative, reference_positive, _, trajectory = setup
    m = recording_rows(sd15.model)
    sample_with_reference(m, TrajectoryReference(trajectory, offset=0), positive, negative, reference_positive,
                          torch.zeros(1, 4, 8, 8), trajectory.sigmas, seed=1, cfg=5.0, sampler_name="heun")
    scale = sd15.model.model.latent_format.scale_factor
    assert len(m.calls) > trajectory.steps
    for sigma, rows in m.calls:
        want = reference_latent(trajectory.latents, trajectory.sigmas, sigma, 0)[0] * scale
        assert torch.allclose(rows[0], want, atol=1e-4)


def test_without_sharing_the_generated_rows_are_exactly_ksampler_rows(setup):
    sd15, positive, negative, reference_positive, _, trajectory = setup
    latent = torch.zeros(3, 4, 8, 8)
    ours = sample_with_reference(sd15.model, TrajectoryReference(trajectory, 5), positive, negative,
                                 reference_positive, latent, trajectory.sigmas, seed=7, cfg=10.0, sampler_name="euler")
    plain = comfy.sample.sample_custom(sd15.model, comfy.sample.prepare_noise(latent, 7), 10.0,
                                       comfy.samplers.sampler_object("euler"), trajectory.sigmas, positive, negative,
                                       latent, disable_pbar=True, seed=7)
    assert ours.shape == plain.shape and relative_error(ours, plain) <= TOLERANCE


def test_per_row_prompts_give_each_row_its_own_prompt(sd15):
    both = encode_lines(sd15.clip, "a cat\n\n  a dog  \n")
    negative = encode(sd15.clip, "")
    assert both[0][0].shape[0] == 2
    together = sample(sd15.model, both, negative, 2)
    for row, text in enumerate(["a cat", "a dog"]):
        alone = sample(sd15.model, encode(sd15.clip, text), negative, 2)
        assert relative_error(together[row], alone[row]) <= TOLERANCE


def test_sdxl_per_row_prompts_carry_their_pooled_outputs(sdxl):
    both = encode_lines(sdxl.clip, "a cat\na dog")
    single = encode(sdxl.clip, "a dog")
    assert both[0][1]["pooled_output"].shape[0] == 2
    assert torch.equal(both[0][1]["pooled_output"][1], single[0][1]["pooled_output"][0])


def test_the_style_aligned_reference_batch_is_identical_together_or_apart(setup, monkeypatch):
    sd15, positive, negative, reference_positive, _, trajectory = setup
    m = install_style_aligned(sd15.model, StyleAlignedSettings(blocks=resolve_blocks(sd15.model, ALL),
                                                               shared_score_shift=math.log(2)))
    run = lambda: sample_with_reference(m, TrajectoryReference(trajectory, 5), positive, negative, reference_positive,
                                        torch.zeros(2, 4, 8, 8), trajectory.sigmas, 3, 10.0, "euler")
    together = run()
    with cond_and_uncond_apart(m, monkeypatch, 3):
        apart = run()
    assert relative_error(apart, together) <= TOLERANCE


def test_a_noised_reference_is_the_latent_plus_fresh_seeded_noise_each_step(setup):
    sd15, positive, negative, reference_positive, reference, _ = setup
    m = recording_rows(sd15.model)
    sigmas = schedule(sd15.model, "normal", 3)
    sample_with_reference(m, NoisedReference(reference, seed=9), positive, negative, reference_positive,
                          torch.zeros(1, 4, 8, 8), sigmas, seed=9, cfg=7.0, sampler_name="euler",
                          cond_only_reference=True)
    scale = sd15.model.model.latent_format.scale_factor
    noises = [(rows[0] - reference[0] * scale) / sigma for sigma, rows in m.calls]
    assert all(0.5 < float(n.std()) < 1.5 for n in noises)
    assert not torch.allclose(noises[0], noises[1])
    expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9 + 1 + 1))[0]
    assert torch.allclose(noises[1], expected, atol=1e-4)


def test_colour_calibration_gives_each_image_the_reference_channel_statistics(sd15):
    guider = ReferenceRowGuider(sd15.model, source=None, colour_window=SigmaWindow(2.0, 1.0), cond_only_reference=True)
    g = torch.Generator().manual_seed(0)
    denoised, cond = torch.randn(3, 4, 8, 8, generator=g) * 3, torch.randn(3, 4, 8, 8, generator=g)
    inside = guider._post_cfg({"denoised": denoised, "cond_denoised": cond, "sigma": torch.tensor([1.5])})
    assert torch.equal(inside[0], cond[0])                       # reference row: conditional prediction
    assert torch.allclose(inside[1:], match_channel_stats(denoised[1:], cond[:1]))
    outside = guider._post_cfg({"denoised": denoised, "cond_denoised": cond, "sigma": torch.tensor([5.0])})
    assert torch.equal(outside[1:], denoised[1:])


def official_calibrated_ddim_step(z, eps, alpha, alpha_prev):
    """VSP's scheduling_ddim.py step inside the window: predicted x0 of every row fitted per channel
    to row 0's (unbiased std + 1e-8), then the DDIM step (η = 0) with the predicted noise kept."""
    x0 = (z - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
    ref = x0[:1]
    x0 = (x0 - x0.mean(dim=(2, 3), keepdim=True)) / (x0.std(dim=(2, 3), keepdim=True) + 1e-8)
    x0 = x0 * ref.std(dim=(2, 3), keepdim=True) + ref.mean(dim=(2, 3), keepdim=True)
    return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


@pytest.mark.parametrize("sampler_name", ["euler", "ddim"])
def test_the_calibrated_step_is_the_official_ddim_step(setup, sampler_name):
    from stylekit.host.schedule import percent_window

    sd15, positive, negative, reference_positive, reference, _ = setup
    sigmas = schedule(sd15.model, "ddim_uniform", 50)[42:44]   # t = 141 -> 121, inside 100 < t < 150
    window = percent_window(sd15.model, 0.85, 0.9)
    assert window.contains(float(sigmas[0]))
    m = sd15.model.clone()
    seen = {}

    def record(args):  # runs before the guider's own hook: the guided prediction before calibration
        seen.update(x=args["input"].clone(), denoised=args["denoised"].clone(), cond=args["cond_denoised"].clone())
        return args["denoised"]

    m.set_model_sampler_post_cfg_function(record)
    out = sample_with_reference(m, NoisedReference(reference, seed=4), positive, negative, reference_positive,
                                torch.zeros(2, 4, 8, 8), sigmas, seed=4, cfg=7.0, sampler_name=sampler_name,
                                colour_window=window, cond_only_reference=True)
    sigma, sigma_next = float(sigmas[0]), float(sigmas[1])
    x, denoised = seen["x"].double(), seen["denoised"].double()
    denoised[:1] = seen["cond"][:1].double()                  # official: row 0 uses its text prediction
    eps = (x - denoised) / sigma
    alpha, alpha_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    want = official_calibrated_ddim_step(x * alpha ** 0.5, eps, alpha, alpha_prev) / alpha_prev ** 0.5
    got = sd15.model.model.process_latent_in(out).double()
    assert relative_error(got, want[1:]) < 1e-5
    # In sigma terms that is x' = x0_cal + σ'·ε; an Euler step on the calibrated x0 alone (the
    # denoised output replaced, the noise derived from it) lands elsewhere.
    x0_cal = match_channel_stats(denoised[1:], denoised[:1])
    assert relative_error(x0_cal + sigma_next * eps[1:], want[1:]) < 1e-5
    naive = x0_cal + (x[1:] - x0_cal) / sigma * (sigma_next - sigma)
    assert relative_error(naive, want[1:]) > 1e-2


def test_a_reference_of_another_size_is_refused_clearly(setup):
    sd15, positive, negative, reference_positive, _, trajectory = setup
    with pytest.raises(InputError, match="input 'latent_image': its latent is.*reference's") as caught:
        sample_with_reference(sd15.model, TrajectoryReference(trajectory, 5), positive, negative, reference_positive,
                              torch.zeros(1, 4, 16, 16), trajectory.sigmas, 0, 5.0, "euler")
    assert caught.value.input_name == "latent_image"
