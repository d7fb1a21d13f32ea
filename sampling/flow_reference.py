"""A reference row that replays a flow inversion (Flux, SD3/3.5) in sampling/reference.py's guider.

The row is the inversion's state at the step's sigma (FlowInversion.state_at: the stored state
at a schedule point, exactly), already in model space: no process_latent_in is applied again, and
for rectified-flow sampling the model's input is the state itself, so the model sees the replayed
reference exactly as the inversion computed it (the UNet lesson). No pinning offset: the official
offset is a DDIM-inversion remedy of the UNet StyleAligned; flows replay step by step.
"""
from __future__ import annotations

from typing import Callable

import torch

from .flow_inversion import FlowInversion


class FlowTrajectoryReference:
    def __init__(self, inversion: FlowInversion):
        if inversion.states.shape[1] != 1:
            raise ValueError(f"the inversion holds {inversion.states.shape[1]} images; invert a single "
                             "reference image")
        self.inversion = inversion
        self.shape = tuple(inversion.states.shape[1:])

    def bind(self, process_in: Callable, sigmas: torch.Tensor) -> Callable[[float], torch.Tensor]:
        return self.inversion.state_at
