"""DDIM inversion of a latent, with its per-step trajectory as a typed output."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..sampling.flow_inversion import check_flow_model, invert_flow
from ..sampling.inversion import DDIM, METHODS, invert, schedule
from ._common import DISPLAY_NAMES, Trajectory, category, check_latent, node_error

# The trajectory keeps x at every step in host RAM (fp32): steps x latent size is bounded.
MAX_TRAJECTORY_BYTES = 2 << 30

NAME = DISPLAY_NAMES["StyleKitDDIMInversion"]


class StyleKitDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitDDIMInversion",
            display_name=NAME,
            category=category("sampling"),
            description=(
                "Deterministic inversion of a latent to noise. ddim: the official DDIM inversion loop "
                "(google/style-aligned): the UNet sees the current DDIM latent at the next timestep, starting "
                "from the latent at the level of timestep 0. renoise: ReNoise inversion with InstantStyle-Plus's "
                "settings (1 renoise step, averaged noise estimates and noise regularisation, λ_AC 20, λ_KL "
                "0.065; official with cfg 1, i.e. no guidance). Outputs the inverted latent (sample it with the "
                "same model, prompt, cfg, steps and scheduler and no added noise to get the image back) and the "
                "whole trajectory for the reference samplers. Official StyleAligned settings: ddim, 50 steps, "
                "cfg 2, the image's caption as positive and a zeroed negative (ConditioningZeroOut). SD1.x, "
                "SD2.x, SDXL. On rectified-flow models (Flux, SD3/3.5) method ddim inverts the flow ODE by "
                "inverse Euler instead (cfg 1 and the scheduler 'simple' for Flux dev); its inverted latent is "
                "the sampling noise, for the trajectory input of StyleKit StyleAligned Reference Sampler and "
                "StyleKit Visual Style Prompting Reference Sampler; controller > 0 runs RF-Inversion's "
                "controlled variant."),
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
                             tooltip="ddim only: extra model evaluations per step that solve the exact inverse "
                                     "of a sampling step (ours, not in the official loop): each one costs a "
                                     "step's time and shrinks the round-trip error. 0 is the official loop."),
                io.Combo.Input("method", options=list(METHODS), default=DDIM, optional=True,
                               tooltip="ddim: official StyleAligned DDIM inversion. renoise: ReNoise as "
                                       "InstantStyle-Plus runs it (about 3 UNet evaluations per step; "
                                       "official with cfg 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, optional=True,
                             tooltip="renoise: seeds its forward noise and the regulariser's random rolls; "
                                     "controlled flow inversion: seeds the noise it steers towards."),
                io.Float.Input("controller", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Flux / SD3 only: RF-Inversion's controller γ, each inverse step's "
                                       "velocity pulled towards the straight path to a seeded Gaussian noise. "
                                       "0 = plain inverse Euler (the most faithful); 1 ends exactly on that "
                                       "noise."),
            ],
            outputs=[io.Latent.Output(display_name="inverted_latent"),
                     Trajectory.Output(display_name="trajectory")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, steps, cfg, scheduler,
                fixed_point_iterations, method=DDIM, seed=0, controller=0.0) -> io.NodeOutput:
        check_latent(NAME, "latent_image", latent_image)
        if method not in METHODS:
            raise node_error(NAME, "method", f"{method!r} is not a method; choose {' or '.join(METHODS)}")
        size = (steps + 1) * latent_image["samples"].numel() * 4
        if size > MAX_TRAJECTORY_BYTES:
            raise node_error(NAME, "steps", f"{steps} steps of a {tuple(latent_image['samples'].shape)} latent "
                             f"make a trajectory of {size / 2**30:.1f} GiB, beyond the limit of "
                             f"{MAX_TRAJECTORY_BYTES / 2**30:.0f} GiB; use fewer steps (50 is official) or a "
                             "smaller latent")
        try:
            check_flow_model(model)
            flow = True
        except ValueError:
            flow = False
        if flow:
            if method != DDIM:
                raise node_error(NAME, "method", f"{method!r} inverts DDPM models (SD1.x, SD2.x, SDXL); this is a "
                                 "rectified-flow model: choose ddim (inverse Euler of the flow)")
            try:
                inversion = invert_flow(model, latent_image["samples"], positive, negative,
                                        schedule(model, scheduler, steps), cfg=cfg,
                                        fixed_point_iterations=fixed_point_iterations, seed=seed,
                                        controller=controller)
            except ValueError as err:
                raise node_error(NAME, "scheduler", err) from err
            return io.NodeOutput({"samples": model.model.process_latent_out(inversion.noise.clone())}, inversion)
        if controller:
            raise node_error(NAME, "controller", f"{controller} steers a rectified-flow inversion (Flux, SD3/3.5) "
                             "and this model is not one; set it to 0")
        try:
            trajectory = invert(model, latent_image["samples"], positive, negative,
                                schedule(model, scheduler, steps), cfg=cfg,
                                fixed_point_iterations=fixed_point_iterations if method == DDIM else 0,
                                seed=seed, method=method)
        except ValueError as err:
            raise node_error(NAME, "model", err) from err
        return io.NodeOutput({"samples": trajectory.inverted.clone()}, trajectory)


NODES = [StyleKitDDIMInversion]
