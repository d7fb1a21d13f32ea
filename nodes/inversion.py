"""DDIM inversion of a latent, with its per-step trajectory as a typed output."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..sampling.flow_inversion import check_flow_model, invert_flow
from ..sampling.inversion import invert, schedule
from ._common import DISPLAY_NAMES, Trajectory, category, check_latent, node_error

NAME = DISPLAY_NAMES["StyleKitDDIMInversion"]


class StyleKitDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitDDIMInversion",
            display_name=NAME,
            category=category("sampling"),
            description=(
                "Deterministic DDIM inversion: runs the sampler's ODE backwards from the latent to noise "
                "(Euler steps towards higher sigma, the noise predicted at the next level, as DDIM "
                "inversion does). Outputs the inverted latent (sample it with the same model, prompt, cfg, "
                "steps and scheduler and no added noise to get the image back) and the whole trajectory "
                "for the reference samplers. Official StyleAligned settings: 50 steps, cfg 2, the image's "
                "caption as positive and a zeroed negative (ConditioningZeroOut). SD1.x, SD2.x, SDXL. On "
                "rectified-flow models (Flux, SD3/3.5) it inverts the flow ODE by inverse Euler instead "
                "(cfg 1 and the scheduler 'simple' for Flux dev); its inverted latent is the sampling "
                "noise, for StyleKit StyleAligned Reference Sampler's trajectory."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="A prompt describing the image (its caption)."),
                io.Conditioning.Input("negative", tooltip="Official: an all-zero negative (ConditioningZeroOut)."),
                io.Latent.Input("latent_image", tooltip="The image to invert, VAE-encoded."),
                io.Int.Input("steps", default=50, min=1, max=10000),
                io.Float.Input("cfg", default=2.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Low guidance keeps the inversion faithful: 1 is exact ODE inversion "
                                       "(no negative pass), official StyleAligned uses 2."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ddim_uniform gives the official DDIM timesteps; sample later with the same."),
                io.Int.Input("fixed_point_iterations", default=0, min=0, max=10,
                             tooltip="Extra model evaluations per step that solve the exact inverse of a "
                                     "sampling step (ReNoise-style refinement): each one costs a step's time "
                                     "and shrinks the round-trip error. 0 is plain DDIM inversion (official)."),
            ],
            outputs=[io.Latent.Output(display_name="inverted_latent"),
                     Trajectory.Output(display_name="trajectory")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, steps, cfg, scheduler,
                fixed_point_iterations) -> io.NodeOutput:
        check_latent(NAME, "latent_image", latent_image)
        try:
            check_flow_model(model)
            flow = True
        except ValueError:
            flow = False
        if flow:
            try:
                inversion = invert_flow(model, latent_image["samples"], positive, negative,
                                        schedule(model, scheduler, steps), cfg=cfg,
                                        fixed_point_iterations=fixed_point_iterations)
            except ValueError as err:
                raise node_error(NAME, "scheduler", err) from err
            return io.NodeOutput({"samples": model.model.process_latent_out(inversion.noise.clone())}, inversion)
        try:
            trajectory = invert(model, latent_image["samples"], positive, negative,
                                schedule(model, scheduler, steps), cfg=cfg,
                                fixed_point_iterations=fixed_point_iterations)
        except ValueError as err:
            raise node_error(NAME, "model", err) from err
        return io.NodeOutput({"samples": trajectory.inverted.clone()}, trajectory)


NODES = [StyleKitDDIMInversion]
