"""Sigma windows: a patch is active only while the sampler's sigma lies inside its window."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SigmaWindow:
    sigma_start: float   # the window opens at this (higher) sigma ...
    sigma_end: float     # ... and closes below this (lower) one

    def contains(self, sigma: float | None) -> bool:
        """None (a UNet call outside sampling, with no sigma) counts as inside."""
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    @classmethod
    def always(cls) -> "SigmaWindow":
        return cls(float("inf"), 0.0)


def percent_window(model_patcher, start_percent: float, end_percent: float) -> SigmaWindow:
    """The window of a start/end percent pair, as core's ControlNet and PAG-style nodes read them."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent {start_percent} and end_percent {end_percent} must satisfy "
                         "0 <= start <= end <= 1")
    sampling = model_patcher.get_model_object("model_sampling")
    return SigmaWindow(sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent))


def current_sigma(extra_options: dict) -> float | None:
    """The sigma of the step being computed (every row of a UNet call shares it), if known."""
    sigmas = extra_options.get("sigmas")
    return None if sigmas is None else float(sigmas.detach().flatten()[0])
