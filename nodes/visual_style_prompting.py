"""Visual Style Prompting: self-attention keys/values swapped in from a reference, and its real-image sampler."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..host.layer_select import ALL, CUSTOM, UP_ONLY, VSP_DEFAULT
from ..host.schedule import percent_window
from ..patching.sharing import installed_sharing
from ..patching.visual_style import VisualStyleSettings, first_steps_guidance, install_visual_style_prompting
from ..sampling.inversion import schedule
from ..sampling.flow_reference import FlowTrajectoryReference
from ..sampling.reference import NoisedReference, TrajectoryReference
from ._common import DISPLAY_NAMES, Trajectory, category, check_latent, node_error, percent_inputs
from ..patching.joint_sharing import VISUAL_STYLE
from .dit_sharing import install_dit, is_dit, positions_input
from .style_aligned import _blocks_inputs, _resolve, check_flow_trajectory, check_no_joint_sharing, reference_sample

NAME = DISPLAY_NAMES["StyleKitVisualStylePrompting"]
SAMPLER_NAME = DISPLAY_NAMES["StyleKitVisualStylePromptingReferenceSampler"]
PRESETS = [VSP_DEFAULT, UP_ONLY, ALL, CUSTOM]


class StyleKitVisualStylePrompting(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitVisualStylePrompting",
            display_name=NAME,
            category=category("shared attention"),
            description=(
                "Visual Style Prompting (Jeong et al.): in the chosen layers every image's self-attention "
                "keys and values are replaced by those of the batch's first image (the reference); queries "
                "stay, so content follows each image's prompt and style the reference. Default layers as "
                "the official code: SDXL up_blocks.1 (output 3-5); on SD1.5 the matching highest-"
                "resolution up block, up_blocks.3 (output 9-11). Self-attention only; works whether "
                "ComfyUI runs cond and uncond together or apart. On Flux and SD3/3.5 the image-token keys "
                "and values of the joint attention are swapped (text tokens kept); the default preset "
                "gives Flux's Stable Flow vital layers (double 0, 1, 17, 18; single 6, 9, 34, 35, 37) and "
                "SD3's second half of the joint blocks (StyleKit's choice: no published study)."),
            inputs=[
                io.Model.Input("model"),
                *_blocks_inputs(VSP_DEFAULT, PRESETS),
                *percent_inputs("the swap"),
                io.Float.Input("first_steps_cfg", default=20.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance for the first steps instead of the sampler's cfg; 0 = off. "
                                       "Default as the official generated-reference setting: 20 for the first 3 "
                                       "of 50 steps (7 after)."),
                io.Int.Input("first_steps", default=3, min=0, max=10000,
                             tooltip="How many first steps use first_steps_cfg."),
                positions_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, blocks, custom_blocks, start_percent, end_percent, first_steps_cfg,
                first_steps, reference_positions=None) -> io.NodeOutput:
        if start_percent > end_percent:
            raise node_error(NAME, "start_percent", f"{start_percent} is after end_percent {end_percent}; "
                             "make start_percent <= end_percent")
        if is_dit(model):
            m = install_dit(NAME, model, VISUAL_STYLE, blocks, custom_blocks, start_percent=start_percent,
                            end_percent=end_percent, reference_positions=reference_positions)
            if first_steps_cfg > 0.0 and first_steps > 0:
                m.set_model_sampler_post_cfg_function(first_steps_guidance(first_steps_cfg, first_steps))
            return io.NodeOutput(m)
        settings = VisualStyleSettings(blocks=_resolve(NAME, model, blocks, custom_blocks),
                                       start_percent=start_percent, end_percent=end_percent,
                                       first_steps_cfg=first_steps_cfg, first_steps=first_steps)
        return io.NodeOutput(install_visual_style_prompting(model, settings))


class StyleKitVisualStylePromptingReferenceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitVisualStylePromptingReferenceSampler",
            display_name=SAMPLER_NAME,
            category=category("shared attention"),
            description=(
                "Visual Style Prompting with a real reference image. The reference row is, at every step, "
                "either the reference latent noised to that step's level with fresh noise (reference_latent, "
                "the official real-image script; the reference row uses its conditional prediction only) or "
                "the replayed inversion trajectory (trajectory). Optional colour calibration: each image's "
                "predicted x0 gets the reference's channel means and deviations inside a window (official: "
                "100 < t < 150 of 1000). Connect the plain model: this node applies the swap itself. On Flux "
                "and SD3/3.5 the image-token keys and values of the joint attention are swapped (default blocks "
                "as StyleKit Visual Style Prompting); reference_latent is noised as the flow does, (1 − σ)·z0 + "
                "σ·ε, and a trajectory is a flow inversion (StyleKit DDIM Inversion on the same model) replayed "
                "step by step."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="Prompt of the new images (one, or one per image)."),
                io.Conditioning.Input("negative"),
                io.Conditioning.Input("reference_positive",
                                      tooltip="A prompt describing the reference image (a caption)."),
                io.Latent.Input("latent_image", tooltip="The images to generate (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Ignored with a trajectory, which carries its own schedule."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the new images (official: 7)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="euler is DDIM in ComfyUI's parameterisation (the official sampler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ddim_uniform gives the official DDIM timesteps. Ignored with a trajectory."),
                io.Boolean.Input("color_calibration", default=True,
                                 tooltip="Match each image's predicted x0 channel statistics to the reference's "
                                         "inside the calibration window (official: on). With euler or ddim the "
                                         "step is exactly the official DDIM step (calibrated x0, predicted noise "
                                         "kept); other samplers get the calibrated x0 as their denoised "
                                         "prediction, a weaker correction (about 1 − σ_next/σ of it)."),
                io.Float.Input("calibration_start_percent", default=0.85, min=0.0, max=1.0, step=0.001,
                               tooltip="Window start; 0.85 ≈ t = 150 of 1000 (official)."),
                io.Float.Input("calibration_end_percent", default=0.9, min=0.0, max=1.0, step=0.001,
                               tooltip="Window end; 0.9 ≈ t = 100 of 1000 (official)."),
                *_blocks_inputs(VSP_DEFAULT, PRESETS),
                io.Latent.Input("reference_latent", optional=True,
                                tooltip="The reference image, VAE-encoded. Connect this or trajectory."),
                Trajectory.Input("trajectory", optional=True,
                                 tooltip="The reference image's StyleKit DDIM Inversion. Connect this or reference_latent."),
                io.Int.Input("reference_step_offset", default=0, min=0, max=1000, optional=True,
                             tooltip="With a trajectory: keep the reference pinned to step offset+1 for the "
                                     "first steps (0 = replay step by step). Flux and SD3 always replay step "
                                     "by step."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, reference_positive, latent_image, seed, steps, cfg, sampler_name,
                scheduler, color_calibration, calibration_start_percent, calibration_end_percent, blocks,
                custom_blocks, reference_latent=None, trajectory=None, reference_step_offset=0) -> io.NodeOutput:
        check_latent(SAMPLER_NAME, "latent_image", latent_image)
        check_latent(SAMPLER_NAME, "reference_latent", reference_latent)
        if (reference_latent is None) == (trajectory is None):
            raise node_error(SAMPLER_NAME, "reference_latent", "connect exactly one reference, either "
                             "reference_latent (a VAE-encoded image) or trajectory (its inversion)")
        if calibration_start_percent > calibration_end_percent:
            raise node_error(SAMPLER_NAME, "calibration_start_percent", "it is after "
                             "calibration_end_percent; make start <= end")
        check_flow_trajectory(SAMPLER_NAME, model, trajectory)
        dit = is_dit(model)
        if dit:
            check_no_joint_sharing(SAMPLER_NAME, model, "the swap")
        else:
            already = installed_sharing(model)
            if already:
                raise node_error(SAMPLER_NAME, "model", f"the model already has {already[0]} applied; "
                                 "connect the plain model, this sampler applies the swap itself")
        try:
            if trajectory is None:
                # The reference noised to each step's level: z0 + σ·ε, or (1 − σ)·z0 + σ·ε on a flow.
                source, sigmas = (NoisedReference(reference_latent["samples"], seed, flow=dit),
                                  schedule(model, scheduler, steps))
            elif dit:  # a flow inversion, replayed step by step (FlowInversion.state_at)
                source, sigmas = FlowTrajectoryReference(trajectory), trajectory.sigmas
            else:
                source, sigmas = TrajectoryReference(trajectory, reference_step_offset), trajectory.sigmas
        except ValueError as err:
            raise node_error(SAMPLER_NAME, "trajectory" if trajectory is not None else "reference_latent", err) from err
        if dit:
            swapped = install_dit(SAMPLER_NAME, model, VISUAL_STYLE, blocks, custom_blocks)
        else:
            settings = VisualStyleSettings(blocks=_resolve(SAMPLER_NAME, model, blocks, custom_blocks))
            swapped = install_visual_style_prompting(model, settings)
        window = percent_window(model, calibration_start_percent, calibration_end_percent) if color_calibration else None
        return io.NodeOutput({"samples": reference_sample(
            SAMPLER_NAME, swapped, source, positive, negative, reference_positive, latent_image["samples"], sigmas,
            seed, cfg, sampler_name, colour_window=window, cond_only_reference=trajectory is None)})


NODES = [StyleKitVisualStylePrompting, StyleKitVisualStylePromptingReferenceSampler]
