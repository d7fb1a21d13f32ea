"""Names and types every node module shares."""
from comfy_api.latest import io

CATEGORY = "StyleKit"

# The trajectory of an inversion (sampling.trajectory.InversionTrajectory): the inverted latent and
# x at every sigma of the schedule. Produced by StyleKit DDIM Inversion, consumed by the reference
# samplers (and by any node that needs an inversion).
Trajectory = io.Custom("STYLEKIT_TRAJECTORY")


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}"


def percent_inputs(what: str) -> list:
    """start_percent / end_percent inputs: the part of sampling (0 = first step) `what` acts in."""
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Where in sampling {what} starts (0 = the first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Where in sampling {what} ends (1 = the last step). start = end = 1 "
                               "turns it off: the output equals plain sampling."),
    ]
