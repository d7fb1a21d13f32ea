"""The StyleAligned / VSP / inversion / prompt-batch nodes in-process: outputs and clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.nodes.inversion import StyleKitDDIMInversion
from stylekit.nodes.prompt_batch import StyleKitPromptBatch
from stylekit.nodes.style_aligned import StyleKitStyleAligned, StyleKitStyleAlignedReferenceSampler
from stylekit.nodes.visual_style_prompting import (StyleKitVisualStylePrompting,
                                                   StyleKitVisualStylePromptingReferenceSampler)
from stylekit.host.trajectory import InversionTrajectory
from stylekit.tests.host.sharing_support import encode

STYLE_ALIGNED = dict(share_group_norm=True, adain_queries=True, adain_keys=True, adain_values=False,
                     shared_score_scale=1.0, shared_score_shift=0.0, blocks="all", custom_blocks="",
                     only_self_level=0.0, start_percent=0.0, end_percent=1.0)


@pytest.fixture
def conds(sd15):
    return encode(sd15.clip, "a barn"), encode(sd15.clip, ""), encode(sd15.clip, "waves")


@pytest.fixture
def trajectory(sd15, conds):
    positive, negative, reference_positive = conds
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    out = StyleKitDDIMInversion.execute(sd15.model, reference_positive, negative, latent, 4, 2.0, "ddim_uniform", 0)
    inverted, traj = out.result
    assert isinstance(traj, InversionTrajectory) and traj.steps == 4
    assert torch.equal(inverted["samples"], traj.latents[0]) and torch.equal(traj.latents[-1], latent["samples"])
    return traj


def test_style_aligned_node_returns_a_patched_clone(sd15):
    (m,) = StyleKitStyleAligned.execute(sd15.model, **STYLE_ALIGNED).result
    assert m is not sd15.model and len(m.model_options["transformer_options"]["patches_replace"]["attn1"]) == 16


def test_an_unknown_custom_block_names_the_node_the_input_and_the_blocks(sd15):
    settings = dict(STYLE_ALIGNED, blocks="custom", custom_blocks="output 9, output 99")
    with pytest.raises(ValueError) as err:
        StyleKitStyleAligned.execute(sd15.model, **settings)
    text = str(err.value)
    assert text.startswith("StyleKit StyleAligned: input 'custom_blocks': 'output 99'") and "output 11" in text


def test_custom_blocks_accept_comfyui_ids_and_diffusers_names(sd15):
    settings = dict(STYLE_ALIGNED, blocks="custom", custom_blocks="up_blocks.3, middle 0")
    (m,) = StyleKitStyleAligned.execute(sd15.model, **settings).result
    layers = set(m.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert layers == {("output", 9, 0), ("output", 10, 0), ("output", 11, 0), ("middle", 0, 0)}


def test_a_window_that_ends_before_it_starts_is_refused(sd15):
    with pytest.raises(ValueError, match="StyleKit StyleAligned: input 'start_percent'"):
        StyleKitStyleAligned.execute(sd15.model, **dict(STYLE_ALIGNED, start_percent=0.8, end_percent=0.2))


def test_prompt_batch_gives_one_row_per_line_and_the_batch_size(sd15):
    conditioning, batch = StyleKitPromptBatch.execute(sd15.clip, "a cat\n\na dog\na fox").result
    assert batch == 3 and conditioning[0][0].shape[0] == 3
    with pytest.raises(ValueError, match="StyleKit Prompt Batch: input 'text' holds no prompt"):
        StyleKitPromptBatch.execute(sd15.clip, "  \n ")


def test_reference_sampler_generates_the_latent_rows_with_official_defaults(sd15, conds, trajectory):
    positive, negative, reference_positive = conds
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    (out,) = StyleKitStyleAlignedReferenceSampler.execute(
        sd15.model, positive, negative, reference_positive, latent, trajectory, 0, 10.0, "euler", 1,
        round(math.log(2), 4), 1.0, True, "all", "").result
    assert out["samples"].shape == (2, 4, 8, 8) and torch.isfinite(out["samples"]).all()


def test_reference_sampler_refuses_a_model_that_already_shares(sd15, conds, trajectory):
    positive, negative, reference_positive = conds
    (shared,) = StyleKitStyleAligned.execute(sd15.model, **STYLE_ALIGNED).result
    with pytest.raises(ValueError, match="input 'model': the model already has StyleAligned applied"):
        StyleKitStyleAlignedReferenceSampler.execute(
            shared, positive, negative, reference_positive, {"samples": torch.zeros(1, 4, 8, 8)}, trajectory, 0,
            10.0, "euler", 1, 0.6931, 1.0, True, "all", "")


def test_an_offset_beyond_a_short_trajectory_is_capped_with_a_warning(sd15, conds, trajectory, caplog):
    positive, negative, reference_positive = conds
    args = (sd15.model, positive, negative, reference_positive, {"samples": torch.zeros(1, 4, 8, 8)}, trajectory, 0,
            10.0, "euler")
    (capped,) = StyleKitStyleAlignedReferenceSampler.execute(*args, 5, 0.6931, 1.0, True, "all", "").result
    assert "reference_step_offset 5 is not below the trajectory's 4 steps; using 3" in caplog.text
    (explicit,) = StyleKitStyleAlignedReferenceSampler.execute(*args, 3, 0.6931, 1.0, True, "all", "").result
    assert torch.equal(capped["samples"], explicit["samples"])


def test_vsp_nodes_patch_and_sample_from_a_real_reference_latent(sd15, conds):
    positive, negative, reference_positive = conds
    (m,) = StyleKitVisualStylePrompting.execute(sd15.model, "highest-resolution up block", "", 0.0, 1.0,
                                                0.0, 3).result
    assert set(m.model_options["transformer_options"]["patches_replace"]["attn1"]) == {
        ("output", n, 0) for n in (9, 10, 11)}
    reference = {"samples": torch.randn(1, 4, 8, 8)}
    (out,) = StyleKitVisualStylePromptingReferenceSampler.execute(
        sd15.model, positive, negative, reference_positive, {"samples": torch.zeros(2, 4, 8, 8)}, 0, 3, 7.0,
        "euler", "ddim_uniform", True, 0.85, 0.9, "highest-resolution up block", "", reference_latent=reference).result
    assert out["samples"].shape == (2, 4, 8, 8)


def test_vsp_sampler_needs_exactly_one_reference(sd15, conds, trajectory):
    positive, negative, reference_positive = conds
    args = (sd15.model, positive, negative, reference_positive, {"samples": torch.zeros(1, 4, 8, 8)}, 0, 3, 7.0,
            "euler", "ddim_uniform", True, 0.85, 0.9, "highest-resolution up block", "")
    with pytest.raises(ValueError, match="connect exactly one reference"):
        StyleKitVisualStylePromptingReferenceSampler.execute(*args)
    with pytest.raises(ValueError, match="connect exactly one reference"):
        StyleKitVisualStylePromptingReferenceSampler.execute(*args, reference_latent={"samples": torch.zeros(1, 4, 8, 8)},
                                                             trajectory=trajectory)
    (out,) = StyleKitVisualStylePromptingReferenceSampler.execute(*args, trajectory=trajectory).result
    assert out["samples"].shape == (1, 4, 8, 8)


def test_a_reference_batch_of_two_images_is_refused_clearly(sd15, conds):
    positive, negative, reference_positive = conds
    with pytest.raises(ValueError, match="input 'reference_latent': the reference latent holds 2 images"):
        StyleKitVisualStylePromptingReferenceSampler.execute(
            sd15.model, positive, negative, reference_positive, {"samples": torch.zeros(1, 4, 8, 8)}, 0, 3, 7.0,
            "euler", "ddim_uniform", False, 0.85, 0.9, "highest-resolution up block", "",
            reference_latent={"samples": torch.zeros(2, 4, 8, 8)})
