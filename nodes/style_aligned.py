"""StyleAligned: shared self-attention across a batch, and its real-reference sampler."""
from __future__ import annotations

import logging
import math

import comfy.samplers
from comfy_api.latest import io

from ..host.layer_select import ALL, CUSTOM, UP_ONLY, resolve_blocks
from ..patching.sharing import installed_sharing
from ..patching.style_aligned import StyleAlignedSettings, install_style_aligned
from ..sampling.flow_inversion import FlowInversion
from ..sampling.flow_reference import FlowTrajectoryReference
from ..sampling.conditioning import InputError
from ..sampling.reference import TrajectoryReference, sample_with_reference
from ..patching.joint_sharing import STYLE_ALIGNED, installed_joint_sharing
from ._common import DISPLAY_NAMES, Trajectory, category, check_latent, node_error, percent_inputs
from .dit_sharing import install_dit, is_dit, positions_input

NAME = DISPLAY_NAMES["StyleKitStyleAligned"]
SAMPLER_NAME = DISPLAY_NAMES["StyleKitStyleAlignedReferenceSampler"]
LN2 = round(math.log(2), 4)


def _blocks_inputs(default: str, presets: list[str]) -> list:
    return [
        io.Combo.Input("blocks", options=presets, default=default,
                       tooltip="Which self-attention layers share: every layer (the paper), the decoder "
                               "only, or the blocks listed in custom_blocks."),
        io.String.Input("custom_blocks", default="", multiline=False,
                        tooltip="With blocks = custom: ComfyUI ids or ranges, or diffusers names and prefixes, "
                                "comma separated, e.g. 'output 3-4, middle 0', 'output' (every output "
                                "block) or 'up_blocks.1, mid_block'. "
                                "StyleKit Block Map lists them."),
    ]


def _shift_input(default: float) -> io.Float.Input:
    return io.Float.Input("shared_score_shift", default=default, min=-10.0, max=10.0, step=0.01, round=0.0001,
                          tooltip="β added to the logits of the reference's keys: 0 is the paper's batch "
                                  "setting; ln 2 ≈ 0.6931 (official for real reference images) strengthens "
                                  "the reference; negative values weaken it.")


def _scale_input() -> io.Float.Input:
    return io.Float.Input("shared_score_scale", default=1.0, min=0.0, max=10.0, step=0.01,
                          tooltip="s multiplying the reference's logits: 1 is the paper's default; the "
                                  "authors suggest 0.5 (with shift 0) for very famous reference images.")


def _norm_input() -> io.Boolean.Input:
    return io.Boolean.Input("share_group_norm", default=True,
                            tooltip="Normalise each image's GroupNorm groups jointly with the reference. "
                                    "Official settings: on in the SD1.5 batch demo and the real-reference "
                                    "(transfer) demo, off in the SDXL batch demos. LayerNorm sharing is not "
                                    "offered: it is a mathematical no-op.")


def _resolve(node: str, model, preset: str, custom: str) -> tuple:
    try:
        return resolve_blocks(model, preset, custom)
    except (ValueError, TypeError) as err:
        raise node_error(node, "custom_blocks" if preset == CUSTOM else "model", err) from err


class StyleKitStyleAligned(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleAligned",
            display_name=NAME,
            category=category("shared attention"),
            description=(
                "StyleAligned (Hertz et al.): every image of the batch attends to its own self-attention "
                "keys/values plus those of the batch's first image (the reference), with queries and keys "
                "AdaIN-normalised to the reference's statistics after projection. Works whether ComfyUI "
                "runs cond and uncond together or apart; put different prompts per image with StyleKit "
                "Prompt Batch. Self-attention only (attn1); the model passed in is not changed. On Flux and "
                "SD3/3.5 the image tokens of the joint attention are shared (text tokens never): blocks = "
                "custom with empty custom_blocks gives the default (Flux: the single blocks, as the public "
                "Flux StyleAligned; SD3: every joint block); GroupNorm and only_self_level are UNet-only."),
            inputs=[
                io.Model.Input("model"),
                _norm_input(),
                io.Boolean.Input("adain_queries", default=True, tooltip="AdaIN of the queries to the reference's (paper: on)."),
                io.Boolean.Input("adain_keys", default=True, tooltip="AdaIN of the keys to the reference's (paper: on)."),
                io.Boolean.Input("adain_values", default=False, tooltip="AdaIN of the values to the reference's (paper: off)."),
                _scale_input(),
                _shift_input(0.0),
                *_blocks_inputs(ALL, [ALL, UP_ONLY, CUSTOM]),
                io.Float.Input("only_self_level", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of self-attention layers, spread regularly, left unshared "
                                       "(official option); 0 shares every chosen layer."),
                *percent_inputs("sharing"),
                positions_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, share_group_norm, adain_queries, adain_keys, adain_values, shared_score_scale,
                shared_score_shift, blocks, custom_blocks, only_self_level, start_percent, end_percent,
                reference_positions=None) -> io.NodeOutput:
        if start_percent > end_percent:
            raise node_error(NAME, "start_percent", f"{start_percent} is after end_percent {end_percent}; "
                             "make start_percent <= end_percent")
        if is_dit(model):
            return io.NodeOutput(install_dit(
                NAME, model, STYLE_ALIGNED, blocks, custom_blocks, adain_queries=adain_queries,
                adain_keys=adain_keys, adain_values=adain_values, shared_score_scale=shared_score_scale,
                shared_score_shift=shared_score_shift, start_percent=start_percent, end_percent=end_percent,
                reference_positions=reference_positions))
        settings = StyleAlignedSettings(
            blocks=_resolve(NAME, model, blocks, custom_blocks), adain_queries=adain_queries,
            adain_keys=adain_keys, adain_values=adain_values, shared_score_scale=shared_score_scale,
            shared_score_shift=shared_score_shift, share_group_norm=share_group_norm,
            only_self_level=only_self_level, start_percent=start_percent, end_percent=end_percent)
        try:
            return io.NodeOutput(install_style_aligned(model, settings))
        except ValueError as err:
            raise node_error(NAME, "shared_score_shift", err) from err


class StyleKitStyleAlignedReferenceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleAlignedReferenceSampler",
            display_name=SAMPLER_NAME,
            category=category("shared attention"),
            description=(
                "StyleAligned with a real reference image: samples the latent's images while a reference "
                "row replays the image's inversion trajectory (StyleKit DDIM Inversion) at every step, and "
                "every image shares attention with it. Official defaults: generation cfg 10, the reference "
                "pinned to step offset+1 for the first steps with offset 5, shared_score_shift ln 2, "
                "GroupNorm sharing on. Steps and schedule come from the trajectory. Connect the plain "
                "model: this node applies StyleAligned itself."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="Prompt of the new images (one, or one per image)."),
                io.Conditioning.Input("negative"),
                io.Conditioning.Input("reference_positive",
                                      tooltip="The reference image's prompt (the one it was inverted with)."),
                io.Latent.Input("latent_image", tooltip="The images to generate (e.g. Empty Latent Image)."),
                Trajectory.Input("trajectory", tooltip="From StyleKit DDIM Inversion of the reference image."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Float.Input("cfg", default=10.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the new images (official: 10)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="euler is DDIM in ComfyUI's parameterisation (the official sampler)."),
                io.Int.Input("reference_step_offset", default=5, min=0, max=1000,
                             tooltip="The reference stays pinned to the trajectory's step offset+1 for the "
                                     "first steps (official: 5 of 50); 0 replays the trajectory step by "
                                     "step. Capped at the trajectory's steps - 1."),
                _shift_input(LN2),
                _scale_input(),
                _norm_input(),
                *_blocks_inputs(ALL, [ALL, UP_ONLY, CUSTOM]),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, reference_positive, latent_image, trajectory, seed, cfg,
                sampler_name, reference_step_offset, shared_score_shift, shared_score_scale, share_group_norm,
                blocks, custom_blocks) -> io.NodeOutput:
        check_latent(SAMPLER_NAME, "latent_image", latent_image)
        if is_dit(model) or isinstance(trajectory, FlowInversion):
            return io.NodeOutput({"samples": _flow_reference_sample(
                model, positive, negative, reference_positive, latent_image, trajectory, seed, cfg, sampler_name,
                shared_score_shift, shared_score_scale, blocks, custom_blocks)})
        already = installed_sharing(model)
        if already:
            raise node_error(SAMPLER_NAME, "model", f"the model already has {already[0]} applied; "
                             "connect the plain model, this sampler applies StyleAligned itself")
        if reference_step_offset >= trajectory.steps:
            # A short inversion (few steps) with the official offset: pin for all but the last step.
            logging.warning("%s: reference_step_offset %d is not below the trajectory's %d steps; using %d",
                            SAMPLER_NAME, reference_step_offset, trajectory.steps, trajectory.steps - 1)
            reference_step_offset = trajectory.steps - 1
        settings = StyleAlignedSettings(blocks=_resolve(SAMPLER_NAME, model, blocks, custom_blocks),
                                        shared_score_scale=shared_score_scale, shared_score_shift=shared_score_shift,
                                        share_group_norm=share_group_norm)
        try:
            source = TrajectoryReference(trajectory, reference_step_offset)
        except ValueError as err:
            raise node_error(SAMPLER_NAME, "trajectory", err) from err
        try:
            shared = install_style_aligned(model, settings)
        except ValueError as err:
            raise node_error(SAMPLER_NAME, "shared_score_shift", err) from err
        return io.NodeOutput({"samples": reference_sample(
            SAMPLER_NAME, shared, source, positive, negative, reference_positive, latent_image["samples"],
            trajectory.sigmas, seed, cfg, sampler_name)})


def reference_sample(node: str, model, source, *args, **kwargs):
    """sample_with_reference, its refusals (the latent's size, the prompts' batches) as the node's error
    on that input."""
    try:
        return sample_with_reference(model, source, *args, **kwargs)
    except InputError as err:
        raise node_error(node, err.input_name, err.problem) from err


def check_flow_trajectory(node: str, model, trajectory) -> None:
    """A flow inversion goes with a Flux / SD3 model and a DiT with a flow inversion (or none)."""
    if isinstance(trajectory, FlowInversion) and not is_dit(model):
        raise node_error(node, "trajectory", "this trajectory is a flow inversion and the model is not a Flux or "
                         "SD3 model; invert with the model you sample with")
    if trajectory is not None and not isinstance(trajectory, FlowInversion) and is_dit(model):
        raise node_error(node, "trajectory", "the model is a Flux or SD3 model but the trajectory is a DDIM "
                         "inversion; invert the image with StyleKit DDIM Inversion on this model")


def check_no_joint_sharing(node: str, model, method: str) -> None:
    already = installed_joint_sharing(model)
    if already:
        raise node_error(node, "model", f"the model already has {already[0]} applied; connect the plain model, "
                         f"this sampler applies {method} itself")


def _flow_reference_sample(model, positive, negative, reference_positive, latent_image, trajectory, seed, cfg,
                           sampler_name, shared_score_shift, shared_score_scale, blocks, custom_blocks):
    """Flux / SD3: the reference row replays a flow inversion (sampling/flow_reference.py)."""
    check_flow_trajectory(SAMPLER_NAME, model, trajectory)
    check_no_joint_sharing(SAMPLER_NAME, model, "StyleAligned")
    shared = install_dit(SAMPLER_NAME, model, STYLE_ALIGNED, blocks, custom_blocks,
                         shared_score_scale=shared_score_scale, shared_score_shift=shared_score_shift)
    try:
        source = FlowTrajectoryReference(trajectory)
    except ValueError as err:
        raise node_error(SAMPLER_NAME, "trajectory", err) from err
    return reference_sample(SAMPLER_NAME, shared, source, positive, negative, reference_positive,
                            latent_image["samples"], trajectory.sigmas, seed, cfg, sampler_name)


NODES = [StyleKitStyleAligned, StyleKitStyleAlignedReferenceSampler]
