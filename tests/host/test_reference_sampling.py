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
from stylekit.sampling.conditioning import encode_lines
from stylekit.sampling.inversion import invert, schedule
from stylekit.sampling.reference import (NoisedReference, ReferenceRowGuider, TrajectoryReference,
                                         sample_with_reference)
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


def test_row_zero_replays_the_trajectory_with_the_official_pinning(setup):
    sd15, positive, negative, reference_positive, _, trajectory = setup
    m = recording_rows(sd15.model)
    sample_with_reference(m, TrajectoryReference(trajectory, offset=2), positive, negative, reference_positive,
                          torch.zeros(2, 4, 8, 8), trajectory.sigmas, seed=1, cfg=10.0, sampler_name="euler")
    scale = sd15.model.model.latent_format.scale_factor
    assert len(m.calls) == trajectory.steps
    for step, (sigma, rows) in enumerate(m.calls):
        assert sigma == pytest.approx(float(trajectory.sigmas[step]), rel=1e-5)
        want = trajectory.latents[{0: 2, 1: 3, 2: 3}.get(step, step)] * scale   # offset 2: zts[2], then zts[3]...
        assert len(rows) == 2 and all(torch.allclose(r, want[0], atol=1e-5) for r in rows)


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


def test_a_reference_of_another_size_is_refused_clearly(setup):
    sd15, positive, negative, reference_positive, _, trajectory = setup
    with pytest.raises(ValueError, match="input 'latent_image'.*reference's"):
        sample_with_reference(sd15.model, TrajectoryReference(trajectory, 5), positive, negative, reference_positive,
                              torch.zeros(1, 4, 16, 16), trajectory.sigmas, 0, 5.0, "euler")
